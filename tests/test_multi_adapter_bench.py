"""benchmarks/multi_adapter.py on the tiny BERT: results produced and well formed, memory as the server holds it.

No figure is held to a threshold. What must hold: every N and strategy reports a throughput from its own
timed passes, the synthetic variants load (their re-sealed checksums verify) and differ from each other, a
mixed batch gives each row what its adapter gives alone, and the memory reported for each adapter equals its
LoRA and head parameter bytes, counted here from the adapter's own weight file, and the base's bytes equal a
plain transformers load of the same 4-bit model.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

from peftkit.config.recipe import build_recipe
from peftkit.train.training import train
from tests.conftest import make_recipe

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def source(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry holding one LoRA adapter trained for 4 steps on the tiny BERT with a 4-bit base."""
    out = tmp_path_factory.mktemp("multi-adapter")
    data = make_recipe(tiny_dir, out, quant="4bit")
    data["train"].update(max_steps=4, eval_at_start=False, lr=2e-2)
    data["output"]["name"] = "bert-sentiment"
    train(build_recipe(data), echo=lambda line: None)
    return out / "adapters"


def weight_file_bytes(folder: Path) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() * t.element_size() for t in load_file(folder / "adapter_model.safetensors").values())


def plain_4bit_bytes(model_dir: Path) -> int:
    import torch
    from transformers import AutoModel, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    model = AutoModel.from_pretrained(model_dir, quantization_config=quant, device_map={"": "cpu"})
    return model.get_memory_footprint()


def test_multi_adapter_results(source: Path, tiny_dir: Path, tmp_path: Path) -> None:
    import multi_adapter

    out = tmp_path / "results"
    multi_adapter.main(["--registry", str(source), "--adapter", "bert-sentiment", "--data",
                        str(tiny_dir / "cls_dev.tsv"), "--rows", "16", "--adapters", "1", "2", "--repeats", "2",
                        "--check-rows", "8", "--batch-size", "4", "--out", str(out)])
    payload = json.loads((out / "results.json").read_text())
    assert (out / "multi_adapter.png").read_bytes()[:8] == PNG_MAGIC
    markdown = (out / "results.md").read_text()
    assert "| N | mixed | of single |" in markdown and "Target:" in markdown

    assert [v["name"] for v in payload["variants"]] == ["bert-sentiment-v0", "bert-sentiment-v1"]
    assert [v["synthetic"] for v in payload["variants"]] == [False, True]
    check = payload["mixed_batch_check"]
    assert check["ok"] and check["adapters"] == 2 and check["rows"] == 8
    assert check["variants_max_abs_diff_from_v0"] > 0

    rows = payload["rows"]
    assert [r["adapters"] for r in rows] == [1, 2]
    for row in rows:
        for strategy in multi_adapter.STRATEGIES:
            for clock, key in (("cpu", "rows_per_cpu_second"), ("wall", "rows_per_second")):
                seconds = row[f"{strategy}_{clock}_seconds"]
                assert len(seconds) == 2 and all(s > 0 for s in seconds)
                assert row[f"{strategy}_{key}"] == pytest.approx(16 / statistics.median(seconds), rel=1e-3)
        assert row["merged_with_swaps_rows_per_cpu_second"] <= row["merged_rows_per_cpu_second"]
        assert row["padding_mixed"] >= 1 and row["padding_grouped"] >= 1
        assert row["process_rss_bytes"] > row["server_total_bytes"]
    assert rows[0]["mixed_of_single"] == pytest.approx(1.0) and rows[0]["mixed_of_single_wall"] == pytest.approx(1.0)
    assert rows[0]["padding_mixed"] == pytest.approx(rows[0]["padding_grouped"])  # one adapter: the same batches
    assert payload["target"]["adapters"] == 2 and payload["target"]["met"] == (rows[1]["mixed_of_single"] >= 0.8)

    # memory: each adapter's LoRA + head bytes as in its weight file; the base as plain transformers loads it
    adapter_bytes = weight_file_bytes(source / "bert-sentiment")
    assert rows[0]["adapter_bytes"] == {"bert-sentiment-v0": adapter_bytes}
    assert rows[1]["adapter_bytes"] == {"bert-sentiment-v0": adapter_bytes, "bert-sentiment-v1": adapter_bytes}
    assert rows[1]["adapters_total_bytes"] == 2 * adapter_bytes
    base = plain_4bit_bytes(tiny_dir / "bert")
    assert all(r["base_bytes"] == base for r in rows)
    assert rows[1]["server_total_bytes"] == base + 2 * adapter_bytes
    assert rows[1]["merged_models_bytes"] == 2 * payload["merged_model_bytes"] > 0
