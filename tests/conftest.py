from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests import tiny  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]


def pytest_report_header(config: pytest.Config) -> str:
    from peftkit.core.cpu_paths import cpu_flags, cpu_model, plain_peft_path

    return (f"CPU: {cpu_model()}; AVX512/AMX flags: {' '.join(cpu_flags()) or 'none'}; "
            f"bitsandbytes' 4-bit no-grad path here: {plain_peft_path()} (peftkit/core/cpu_paths.py)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip only the packed 4-bit path's cases, and only where bitsandbytes cannot take that path."""
    from tests.cpu_paths import packed_skip_reason

    reason = packed_skip_reason()
    if reason is None:
        return
    for item in items:
        if "packed_cpu_4bit" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["PEFTKIT_CACHE"] = str(tmp_path_factory.mktemp("peftkit-cache"))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    tiny.build_bert(root / "bert")
    tiny.build_llama(root / "llama")
    tiny.write_tsv(root / "cls_train.tsv", tiny.sentiment_rows(256, seed=1))
    tiny.write_tsv(root / "cls_dev.tsv", tiny.sentiment_rows(64, seed=2))
    tiny.write_tsv(root / "reg_train.tsv", tiny.scored_rows(256, seed=5))
    tiny.write_tsv(root / "reg_dev.tsv", tiny.scored_rows(64, seed=6))
    tiny.write_tsv(root / "ml_train.tsv", tiny.labelled_set_rows(256, seed=7))
    tiny.write_tsv(root / "ml_dev.tsv", tiny.labelled_set_rows(64, seed=8))
    tiny.write_instructions(root / "instruct.json", 96, seed=3)
    tiny.write_text(root / "text.txt", 200, seed=4)
    return root


QUANTIZATION = {
    "fp32": {"bits": None},
    "8bit": {"bits": 8},
    "4bit": {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"},
}
ADAPTERS = {
    "lora": {"method": "lora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"},
    "adalora": {"method": "adalora", "init_r": 6, "target_r": 3, "lora_dropout": 0.0, "warmup": 0.2, "final": 0.3,
                "target_modules": "all-linear"},
}


def make_recipe(tiny_dir: Path, out: Path, task: str = "classification", quant: str = "fp32",
                adapter: str | None = "lora", **sections: Any) -> dict[str, Any]:
    """A recipe (as a dict) for the tiny models; keyword sections are deep-merged over the defaults."""
    pooled = {"classification": "cls", "regression": "reg", "multi_label": "ml"}
    if task in pooled:
        recipe = {
            "base": {"model": str(tiny_dir / "bert")},
            "task": {"type": task},
            "data": {"train": str(tiny_dir / f"{pooled[task]}_train.tsv"),
                     "eval": str(tiny_dir / f"{pooled[task]}_dev.tsv"), "max_length": 32},
        }
    else:
        recipe = {
            "base": {"model": str(tiny_dir / "llama")},
            "task": {"type": "causal_lm"},
            "data": {"train": str(tiny_dir / "instruct.json"), "eval_fraction": 0.2, "max_length": 32},
        }
    recipe["quantization"] = copy.deepcopy(QUANTIZATION[quant])
    recipe["adapter"] = copy.deepcopy(ADAPTERS[adapter]) if adapter else None
    recipe["train"] = {"epochs": 2, "batch_size": 16, "lr": 5e-3, "progress": False, "seed": 7,
                       "eval_at_start": True}
    recipe["output"] = {"name": "tiny", "registry": str(out / "adapters"), "runs": str(out / "runs")}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    return recipe


@pytest.fixture
def recipe_for(tiny_dir: Path, tmp_path: Path):
    def build(**kwargs: Any) -> dict[str, Any]:
        return make_recipe(tiny_dir, tmp_path, **kwargs)

    return build


def write_recipe(path: Path, data: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def free_port() -> int:
    """A port nothing listens on now, for torchrun (its --master_port 0 waits forever for the second process)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
