"""The recipe schema: what it accepts, what it refuses, and the exact words it refuses with."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from peftkit.config.recipe import (AdaLoraSection, LoraSection, apply_override, build_recipe, load_recipe,
                                   read_recipe_tree)
from peftkit.errors import PeftkitError, RecipeError
from peftkit.naming import check_adapter_name
from peftkit.tasks import task_types
from tests.conftest import REPO, SHARED_DATA

MINIMAL: dict[str, Any] = {
    "base": {"model": "minilm"},
    "task": {"type": "classification"},
    "data": {"train": "train.tsv"},
    "output": {"name": "run"},
}


def recipe(**sections: Any) -> dict[str, Any]:
    """MINIMAL with some sections replaced (``None`` removes a section)."""
    data = copy.deepcopy(MINIMAL)
    for key, value in sections.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return data


def problems_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(RecipeError) as info:
        build_recipe(data)
    return info.value.problems


def only_problem(data: dict[str, Any]) -> str:
    problems = problems_of(data)
    assert len(problems) == 1, problems
    return problems[0]


def write(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ---- what a valid recipe becomes ----------------------------------------------------------------------


def test_minimal_recipe_gets_the_documented_defaults():
    r = build_recipe(recipe())
    assert r.method == "full" and r.adapter is None
    assert r.quantization.bits is None
    assert (r.train.epochs, r.train.batch_size, r.train.lr, r.train.seed) == (1.0, 16, 5e-4, 42)
    assert (r.data.eval_fraction, r.data.max_length, r.data.format) == (0.1, 128, "auto")
    assert (r.output.registry, r.output.runs) == ("adapters", "runs")


def test_lora_and_adalora_sections_have_their_own_defaults():
    lora = build_recipe(recipe(adapter={"method": "lora"})).adapter
    ada = build_recipe(recipe(adapter={"method": "adalora"})).adapter
    assert isinstance(lora, LoraSection) and (lora.r, lora.lora_alpha, lora.target_modules) == (8, 16.0, "all-linear")
    assert isinstance(ada, AdaLoraSection)
    assert (ada.init_r, ada.target_r, ada.lora_alpha, ada.lr_scale, ada.warmup, ada.final) == (12, 8, 128.0, 2.0, 0.1, 0.3)


def test_to_dict_round_trips():
    r = build_recipe(recipe(adapter={"method": "adalora", "warmup": 20, "final": 0.2}, quantization={"bits": 4}))
    again = build_recipe(r.to_dict())
    assert again == r
    assert isinstance(again.adapter.warmup, int) and again.adapter.warmup == 20  # steps stay steps


# ---- unknown keys -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sections, expected",
    [
        ({"adapter": {"method": "lora", "lora_alfa": 8}}, "adapter.lora_alfa: unknown key; did you mean `lora_alpha`?"),
        ({"adapter": {"method": "adalora", "target_rr": 4}},
         "adapter.target_rr: unknown key; did you mean `target_r`?"),
        ({"trian": {"lr": 1}}, "trian: unknown key; did you mean `train`?"),
        ({"base": {"model": "minilm", "modle": "x"}}, "base.modle: unknown key; did you mean `model`?"),
        ({"train": {"batch_szie": 8}}, "train.batch_szie: unknown key; did you mean `batch_size`?"),
        ({"data": {"train": "t.tsv", "max_lenght": 64}}, "data.max_lenght: unknown key; did you mean `max_length`?"),
        ({"train": {"frobnicate": 1}}, "train.frobnicate: unknown key; remove it"),
    ],
)
def test_unknown_key_is_refused_with_a_suggestion(sections, expected):
    assert only_problem(recipe(**sections)) == expected


def test_unknown_key_message_carries_the_source_file():
    with pytest.raises(RecipeError, match=re.escape("my.yaml: adapter.lora_alfa: unknown key; did you mean")):
        build_recipe(recipe(adapter={"method": "lora", "lora_alfa": 8}), source="my.yaml")


def test_lora_option_under_adalora_says_which_method_it_belongs_to():
    assert only_problem(recipe(adapter={"method": "adalora", "r": 4})) == (
        "adapter.r: unknown key; `r` is a lora option: set method: lora"
    )
    assert only_problem(recipe(adapter={"method": "lora", "init_r": 4})) == (
        "adapter.init_r: unknown key; `init_r` is an adalora option: set method: adalora"
    )


@pytest.mark.parametrize(
    "adapter, expected",
    [
        ({"method": "dora"}, "adapter.method: 'dora' is not a method; use lora or adalora"),
        ({"r": 4}, "adapter.method: missing; set method: lora or method: adalora"),
    ],
)
def test_adapter_method_must_be_named(adapter, expected):
    assert only_problem(recipe(adapter=adapter)) == expected


# ---- every problem at once ----------------------------------------------------------------------------


def test_every_problem_is_reported_at_once_each_with_its_key_path():
    data = recipe(
        data=None,
        trian={},
        adapter={"method": "lora", "r": 0, "lora_alfa": 8},
        train={"lr": -1, "batch_size": "big"},
        task={"type": "classification", "lables": ["a", "b"]},
    )
    with pytest.raises(RecipeError) as info:
        build_recipe(data, source="r.yaml")
    assert sorted(info.value.problems) == sorted([
        "data: required, but missing",
        "trian: unknown key; did you mean `train`?",
        "adapter.r: input should be greater than or equal to 1 (got 0)",
        "adapter.lora_alfa: unknown key; did you mean `lora_alpha`?",
        "train.lr: input should be greater than 0 (got -1)",
        "train.batch_size: input should be a valid integer, unable to parse string as an integer (got 'big')",
        "task.lables: unknown key; did you mean `labels`?",
    ])
    message = str(info.value)
    assert message.startswith("r.yaml: 7 problems: ")
    assert "\n" not in message


# ---- types and ranges ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sections, expected",
    [
        ({"train": {"batch_size": 2.5}},
         "train.batch_size: input should be a valid integer, got a number with a fractional part (got 2.5)"),
        ({"train": {"epochs": "many"}},
         "train.epochs: input should be a valid number, unable to parse string as a number (got 'many')"),
        ({"base": {"model": "minilm", "dtype": "fp16"}},
         "base.dtype: input should be 'float32', 'bfloat16' or 'float16' (got 'fp16')"),
        ({"quantization": {"bits": 3}, "adapter": {"method": "lora"}},
         "quantization.bits: input should be 4 or 8 (got 3)"),
        ({"data": {"train": "t.tsv", "columns": ["text"]}}, "data.columns: input should be a valid dictionary"),
        ({"task": "classification"},
         "task: input should be a valid dictionary or instance of TaskSection (got 'classification')"),
        ({"base": {}}, "base.model: required, but missing"),
    ],
)
def test_wrong_types_are_refused(sections, expected):
    assert only_problem(recipe(**sections)) == expected


@pytest.mark.parametrize(
    "sections, expected",
    [
        ({"train": {"lr": 0}}, "train.lr: input should be greater than 0 (got 0)"),
        ({"train": {"grad_accum": 0}}, "train.grad_accum: input should be greater than or equal to 1 (got 0)"),
        ({"train": {"warmup_ratio": 1.0}}, "train.warmup_ratio: input should be less than 1 (got 1.0)"),
        ({"adapter": {"method": "lora", "lora_dropout": 1.0}},
         "adapter.lora_dropout: input should be less than 1 (got 1.0)"),
        ({"adapter": {"method": "adalora", "beta1": 1.0}}, "adapter.beta1: input should be less than 1 (got 1.0)"),
        ({"data": {"train": "t.tsv", "eval_fraction": 0}},
         "data.eval_fraction: input should be greater than 0 (got 0)"),
        ({"data": {"train": "t.tsv", "max_length": 4}},
         "data.max_length: input should be greater than or equal to 8 (got 4)"),
    ],
)
def test_values_out_of_range_are_refused(sections, expected):
    assert only_problem(recipe(**sections)) == expected


@pytest.mark.parametrize(
    "targets, expected",
    [
        ("q_proj", "adapter.target_modules: use all-linear or a list of module names such as [query, value] "
                   "(got 'q_proj'); for one module write [q_proj]"),
        ([], "adapter.target_modules: use all-linear or a list of module names such as [query, value] (got [])"),
        (3, "adapter.target_modules: use all-linear or a list of module names such as [query, value] (got 3)"),
    ],
)
def test_target_modules_is_all_linear_or_a_list(targets, expected):
    assert only_problem(recipe(adapter={"method": "lora", "target_modules": targets})) == expected
    ok = build_recipe(recipe(adapter={"method": "lora", "target_modules": ["query", "value"]}))
    assert ok.adapter.target_modules == ["query", "value"]


# ---- AdaLoRA's schedule and budget --------------------------------------------------------------------


def test_adalora_target_r_must_not_exceed_init_r():
    assert only_problem(recipe(adapter={"method": "adalora", "init_r": 4, "target_r": 6})) == (
        "adapter.target_r: 6 must be < init_r (4), or AdaLoRA has nothing to prune; lower target_r, raise init_r, or use method: lora"
    )
    assert build_recipe(recipe(adapter={"method": "adalora", "init_r": 7, "target_r": 6})).adapter.target_r == 6
    with pytest.raises(RecipeError, match="must be < init_r"):  # equal ranks leave nothing to prune
        build_recipe(recipe(adapter={"method": "adalora", "init_r": 6, "target_r": 6}))


@pytest.mark.parametrize(
    "warmup, final, expected",
    [
        (0.5, 0.5, "adapter.warmup: warmup + final (0.5 + 0.5) leaves no room for pruning; keep the sum below 1"),
        (0.7, 0.4, "adapter.warmup: warmup + final (0.7 + 0.4) leaves no room for pruning; keep the sum below 1"),
        (1.5, 0.1,
         "adapter.warmup: a fraction of training must be in [0, 1) (got 1.5); or give a whole number of steps"),
        (0.1, -3, "adapter.final: a number of steps must be >= 0 (got -3)"),
        ("soon", 0.1, "adapter.warmup: use a whole number of steps or a fraction in [0, 1) (got 'soon')"),
        (True, 0.1, "adapter.warmup: use a whole number of steps or a fraction in [0, 1) (got True)"),
    ],
)
def test_adalora_phases_are_checked(warmup, final, expected):
    assert only_problem(recipe(adapter={"method": "adalora", "warmup": warmup, "final": final})) == expected


@pytest.mark.parametrize("warmup, final", [(0.5, 0.4), (0.0, 0.0), (100, 0.5), (100, 300)])
def test_adalora_phases_that_leave_room_pass(warmup, final):
    # steps (ints) are checked against the run's length later, when the step count is known
    adapter = build_recipe(recipe(adapter={"method": "adalora", "warmup": warmup, "final": final})).adapter
    assert (adapter.warmup, adapter.final) == (warmup, final)
    assert type(adapter.warmup) is type(warmup)


def test_adalora_phase_in_exponent_notation_is_a_fraction():
    # YAML 1.1 (PyYAML) reads `warmup: 1e-1` as the string "1e-1"
    adapter = build_recipe(recipe(adapter={"method": "adalora", "warmup": "1e-1"})).adapter
    assert adapter.warmup == 0.1 and isinstance(adapter.warmup, float)


def test_adalora_budget_and_phase_problems_come_together():
    problems = problems_of(recipe(adapter={"method": "adalora", "init_r": 2, "target_r": 3, "warmup": 0.6,
                                           "final": 0.6}))
    assert problems == [
        "adapter.target_r: 3 must be < init_r (2), or AdaLoRA has nothing to prune; lower target_r, raise init_r, or use method: lora",
        "adapter.warmup: warmup + final (0.6 + 0.6) leaves no room for pruning; keep the sum below 1",
    ]


# ---- quantization needs an adapter --------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_base_without_adapter_is_refused(bits):
    assert only_problem(recipe(quantization={"bits": bits})) == (
        f"adapter: required with quantization.bits: {bits} (a quantized base is frozen and cannot be fully "
        "fine-tuned); add an adapter section or set quantization.bits: null"
    )
    assert build_recipe(recipe(quantization={"bits": bits}, adapter={"method": "lora"})).quantization.bits == bits
    assert build_recipe(recipe(quantization={"bits": None})).method == "full"


# ---- the task head's options --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "task, expected",
    [
        ({"type": "clasification"}, "task.type: unknown task 'clasification'; did you mean `classification`?"),
        ({"type": "ner"}, "task.type: unknown task 'ner'; use one of: " + ", ".join(sorted(n for n, h in task_types().items() if not h.internal))),
        ({"type": "regresion"}, "task.type: unknown task 'regresion'; did you mean `regression`?"),
        ({"type": "classification", "lables": ["a", "b"]}, "task.lables: unknown key; did you mean `labels`?"),
        ({"type": "classification", "pack": True},
         "task.pack: unknown key; classification options are: type, labels, label_names"),
        ({"type": "causal_lm", "labels": ["a", "b"]},
         "task.labels: unknown key; causal_lm options are: type, format, mask_prompt, chat_template, pack"),
        ({"type": "causal_lm", "format": "chat"},
         "task.format: input should be 'auto', 'text' or 'instruction' (got 'chat')"),
        ({"type": "classification", "labels": ["only"]},
         "task.labels: list should have at least 2 items after validation, not 1"),
        ({"type": "classification", "labels": ["a", "b", "a"]},
         "task.labels: 'a' is listed twice; list each label once"),
        ({}, "task.type: required, but missing"),
    ],
)
def test_task_options_are_validated_by_the_head(task, expected):
    assert only_problem(recipe(task=task)) == expected


def test_task_problems_join_the_schema_problems():
    problems = problems_of(recipe(task={"type": "classification", "lables": []}, train={"lr": 0}))
    assert sorted(problems) == [
        "task.lables: unknown key; did you mean `labels`?",
        "train.lr: input should be greater than 0 (got 0)",
    ]


def test_numeric_labels_are_taken_as_label_names():
    from peftkit.tasks import make_task

    r = build_recipe(recipe(task={"type": "classification", "labels": [0, 1, 2.0]}))
    assert make_task(r.task.type, r.task.options()).options.labels == ["0", "1", "2"]


# ---- adapter names ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a/b", "../escape", "..", "a..b", "a\\b", "/abs", ".hidden", "-dash", "", "x" * 129,
                                  "with space"])
def test_unsafe_adapter_names_are_refused(name):
    problem = only_problem(recipe(output={"name": name}))
    assert problem == (
        f"output.name: adapter name {name!r} is not allowed: use letters, digits, '.', '_' and '-', start with a "
        "letter or digit, no path separators or '..', at most 128 characters"
    )
    with pytest.raises(PeftkitError):
        check_adapter_name(name)


@pytest.mark.parametrize("name", ["sst2-lora", "v1.2_final", "A", "x" * 128])
def test_safe_adapter_names_pass(name):
    assert build_recipe(recipe(output={"name": name})).output.name == name
    assert check_adapter_name(name) == name


# ---- files, extends -----------------------------------------------------------------------------------


def test_missing_recipe_file(tmp_path: Path):
    with pytest.raises(PeftkitError) as info:
        load_recipe(tmp_path / "nope.yaml")
    assert str(info.value) == f"recipe file {tmp_path / 'nope.yaml'} does not exist; check the path"


def test_invalid_yaml_names_the_line(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("base:\n  model: minilm\ntask: [unclosed\n")
    with pytest.raises(PeftkitError, match=r"bad\.yaml: not valid YAML at line \d+"):
        load_recipe(path)


def test_a_recipe_must_be_a_mapping(tmp_path: Path):
    path = tmp_path / "list.yaml"
    path.write_text("- base\n- task\n")
    with pytest.raises(PeftkitError) as info:
        load_recipe(path)
    assert str(info.value) == f"{path}: a recipe must be a mapping of sections, found list"


PARENT = {
    "base": {"model": "minilm"},
    "task": {"type": "classification", "labels": ["0", "1"]},
    "data": {"train": "train.tsv", "max_length": 64},
    "adapter": {"method": "lora", "r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]},
    "train": {"epochs": 3, "lr": 1e-3},
    "output": {"name": "parent"},
}


def test_child_overrides_parent_and_inherits_the_rest(tmp_path: Path):
    write(tmp_path / "parent.yaml", PARENT)
    child = write(tmp_path / "child.yaml", {"extends": "parent.yaml", "adapter": {"r": 4},
                                            "train": {"lr": 5e-3}, "output": {"name": "child"}})
    r = load_recipe(child)
    assert r.output.name == "child"
    assert (r.train.lr, r.train.epochs) == (5e-3, 3)  # sections merge key by key
    assert isinstance(r.adapter, LoraSection)
    assert (r.adapter.r, r.adapter.lora_alpha, r.adapter.target_modules) == (4, 16, ["query", "value"])
    assert r.data.max_length == 64 and r.task.options() == {"labels": ["0", "1"]}


def test_child_with_another_adapter_method_replaces_the_parent_adapter(tmp_path: Path):
    write(tmp_path / "parent.yaml", PARENT)
    child = write(tmp_path / "child.yaml", {"extends": "parent.yaml",
                                            "adapter": {"method": "adalora", "init_r": 6, "target_r": 2}})
    r = load_recipe(child)  # the parent's `r` would be an unknown key under adalora if it were merged in
    assert isinstance(r.adapter, AdaLoraSection)
    assert (r.adapter.init_r, r.adapter.target_r) == (6, 2)
    assert r.adapter.target_modules == "all-linear" and r.adapter.lora_alpha == 128.0  # adalora's defaults


def test_child_with_another_task_type_replaces_the_parent_task(tmp_path: Path):
    write(tmp_path / "parent.yaml", PARENT)
    child = write(tmp_path / "child.yaml", {"extends": "parent.yaml", "task": {"type": "causal_lm"}})
    r = load_recipe(child)
    assert r.task.type == "causal_lm" and r.task.options() == {}


def test_child_can_drop_the_parent_adapter(tmp_path: Path):
    write(tmp_path / "parent.yaml", PARENT)
    child = write(tmp_path / "child.yaml", {"extends": "parent.yaml", "adapter": None})
    assert load_recipe(child).method == "full"


def test_extends_chains_and_is_relative_to_the_file(tmp_path: Path):
    write(tmp_path / "base" / "parent.yaml", PARENT)
    write(tmp_path / "base" / "middle.yaml", {"extends": "parent.yaml", "train": {"epochs": 5}})
    child = write(tmp_path / "runs" / "child.yaml", {"extends": "../base/middle.yaml", "output": {"name": "c"}})
    r = load_recipe(child)
    assert (r.train.epochs, r.train.lr, r.output.name) == (5, 1e-3, "c")


def test_extends_loop_is_an_error(tmp_path: Path):
    a = write(tmp_path / "a.yaml", {"extends": "b.yaml", **PARENT})
    b = write(tmp_path / "b.yaml", {"extends": "a.yaml"})
    with pytest.raises(PeftkitError) as info:
        load_recipe(a)
    assert str(info.value) == f"recipe extends itself in a loop: {a} -> {b} -> {a}; remove one of the extends"


def test_extends_itself_is_an_error(tmp_path: Path):
    a = write(tmp_path / "a.yaml", {"extends": "a.yaml", **PARENT})
    with pytest.raises(PeftkitError, match=re.escape(f"recipe extends itself in a loop: {a} -> {a}")):
        load_recipe(a)


def test_missing_parent_is_an_error(tmp_path: Path):
    child = write(tmp_path / "child.yaml", {"extends": "gone.yaml", "output": {"name": "c"}})
    with pytest.raises(PeftkitError) as info:
        load_recipe(child)
    assert str(info.value) == (
        f"{child}: extends: gone.yaml does not exist (looked for {tmp_path / 'gone.yaml'}); fix the path"
    )


def test_extends_must_be_a_path(tmp_path: Path):
    child = write(tmp_path / "child.yaml", {"extends": ["a.yaml", "b.yaml"]})
    with pytest.raises(PeftkitError, match=re.escape("extends must be a path to a recipe file, found ['a.yaml'")):
        read_recipe_tree(child)


# ---- --set overrides ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "assignment, path, value",
    [
        ("train.epochs=2", ("train", "epochs"), 2),
        ("train.lr=1e-4", ("train", "lr"), "1e-4"),  # YAML 1.1: no dot, so a string; pydantic parses it
        ("train.lr=0.0001", ("train", "lr"), 0.0001),
        ("train.progress=false", ("train", "progress"), False),
        ("adapter.target_modules=[query, value]", ("adapter", "target_modules"), ["query", "value"]),
        ("train.max_steps=null", ("train", "max_steps"), None),
        ("train.max_steps=", ("train", "max_steps"), None),
        ("output.name=new-name", ("output", "name"), "new-name"),
        ("data.train=a=b.tsv", ("data", "train"), "a=b.tsv"),  # only the first '=' splits
        ("brand.new.key=1", ("brand", "new", "key"), 1),  # sections are created, then validated
    ],
)
def test_apply_override_parses_the_value_as_yaml(assignment, path, value):
    data = copy.deepcopy(PARENT)
    apply_override(data, assignment)
    node: Any = data
    for part in path:
        node = node[part]
    assert node == value and type(node) is type(value)
    assert data["train"]["epochs"] == (2 if assignment.startswith("train.epochs") else 3)  # nothing else moved


@pytest.mark.parametrize("assignment", ["train.epochs", "=3", "  =3"])
def test_apply_override_needs_key_equals_value(assignment):
    with pytest.raises(PeftkitError) as info:
        apply_override({}, assignment)
    assert str(info.value) == f"--set {assignment!r}: expected KEY=VALUE, for example --set train.epochs=2"


def test_apply_override_cannot_descend_into_a_value():
    with pytest.raises(PeftkitError) as info:
        apply_override(copy.deepcopy(PARENT), "train.epochs.max=3")
    assert str(info.value) == (
        "--set train.epochs.max=3: train.epochs is a value, not a section; set train.epochs=... instead"
    )


def test_overrides_apply_after_extends_and_are_validated(tmp_path: Path):
    write(tmp_path / "parent.yaml", PARENT)
    child = write(tmp_path / "child.yaml", {"extends": "parent.yaml", "train": {"epochs": 1}})
    r = load_recipe(child, ["train.epochs=4", "adapter.r=2", "train.group_by_length=no", "task.labels=[0, 1]"])
    assert (r.train.epochs, r.adapter.r, r.train.group_by_length) == (4, 2, False)
    with pytest.raises(RecipeError) as info:
        load_recipe(child, ["train.lr=-1", "adapter.rr=2"])
    assert info.value.problems == [
        "adapter.rr: unknown key; did you mean `r`?",
        "train.lr: input should be greater than 0 (got -1)",
    ]


# ---- every recipe in the repository -------------------------------------------------------------------

RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))


def test_recipes_are_found():
    assert len(RECIPES) > 0


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(REPO)) for p in RECIPES])
def test_every_recipe_validates(path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(REPO)  # data paths in recipes are relative to the repository root
    loaded = load_recipe(path)
    assert loaded.output.name
    if SHARED_DATA.is_dir():
        from peftkit.ops.validate import check_data

        summary = check_data(loaded)
        counts = r"data: [\d,]+ train rows( \([\d,]+ before data.augment\))?, [\d,]+ eval rows"
        assert re.match(counts, summary), summary


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(REPO)) for p in RECIPES])
def test_every_recipe_opens_with_a_comment_whose_commands_name_real_recipes(path: Path):
    text = path.read_text()
    assert text.startswith("#"), f"{path} should start with a comment giving its launch command"
    header = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    for named in re.findall(r"peftkit (?:train|validate) (\S+)", "\n".join(header)):
        assert (REPO / named).is_file(), f"{path}: its comment launches {named}, which does not exist"


def test_a_numeric_adapter_name_is_text():
    assert build_recipe(recipe(output={"name": 2024})).output.name == "2024"
