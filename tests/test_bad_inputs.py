"""Bad input of every kind through the real CLI: a non-zero exit and one ``Error: ...`` line, pinned exactly.

One table covers the classes of bad input: recipe syntax and encoding, types, ranges, unknown keys,
``extends:``, data files, columns, labels and rows, CLI options, registry names and adapters. Most rows fail
before any model loads; those that need an adapter share one tiny adapter trained once for the module.
The code-execution cases (pickles, code in metadata, remote code) live in ``test_security.py``.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path
from string import Template
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from peftkit.cli import main
from peftkit.config.recipe import build_recipe
from peftkit.store.registry import Registry
from peftkit.train.training import train
from tests import tiny
from tests.conftest import make_recipe, write_recipe

RECIPE = "$root/r.yaml"
NO_DATA = f"validate {RECIPE} --no-data --set"


@pytest.fixture(scope="module")
def world(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Paths the table's rows name: a good recipe, bad recipe and data files, a registry holding `tiny`."""
    root = tmp_path_factory.mktemp("bad")
    data = make_recipe(tiny_dir, root, train={"max_steps": 2, "eval_at_start": False})
    write_recipe(root / "r.yaml", data)
    train(build_recipe(data), echo=lambda line: None)

    (root / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (root / "latin1.yaml").write_bytes("base:\n  model: caf\xe9\n".encode("latin-1"))
    (root / "list.yaml").write_text("- base\n- task\n")
    (root / "syntax.yaml").write_text("base:\n  model: x\n task: oops\n")
    (root / "empty.yaml").write_text("")
    (root / "folder.yaml").mkdir()
    for name, parent in [("ext-binary", "binary.yaml"), ("ext-folder", "folder.yaml"), ("ext-missing", "gone.yaml"),
                         ("loop-a", "loop-b.yaml"), ("loop-b", "loop-a.yaml"), ("ext-number", 3)]:
        (root / f"{name}.yaml").write_text(yaml.safe_dump({"extends": parent, **data}))

    rows = tiny.sentiment_rows(12, seed=3)
    tiny.write_tsv(root / "good.tsv", rows)
    lines = (root / "good.tsv").read_text().splitlines()
    (root / "ragged.tsv").write_text("\n".join([*lines[:4], lines[4].split("\t")[0], *lines[5:]]) + "\n")
    (root / "empty-label.tsv").write_text("\n".join([*lines[:6], lines[6].split("\t")[0] + "\t", *lines[7:]]) + "\n")
    (root / "empty-text.tsv").write_text("\n".join([*lines[:2], "\t1", *lines[3:]]) + "\n")
    (root / "empty-label.json").write_text(json.dumps([{"sentence": "good film", "label": 1},
                                                        {"sentence": "bad film", "label": ""}]))
    shutil.copy(root / "good.tsv", root / "data.xyz")
    (root / "empty.csv").write_text("")
    (root / "header.csv").write_text("sentence,label\n")
    (root / "wide.csv").write_text("sentence,label\ngood film,1\nbad, bad film,0\n")
    (root / "broken.json").write_text('[{"sentence": "good", "label": 1},')
    tiny.write_tsv(root / "one-label.tsv", [{**r, "label": 1} for r in rows])
    tiny.write_tsv(root / "unknown-label.tsv", [{**r, "label": 7 if i == 5 else r["label"]} for i, r in enumerate(rows)])
    (root / "data-folder").mkdir()

    (root / "case.py").write_text("print('not a registry')\n")
    (root / "broken" / "half").mkdir(parents=True)  # a folder without peftkit.json, as a killed copy leaves
    return {"root": str(root), "registry": str(root / "adapters"), "tiny": str(tiny_dir)}


def first_line(world: dict[str, str], args: str) -> tuple[int, str]:
    """Run the CLI in-process; check that it failed without a traceback; return its exit code and first line."""
    result = CliRunner().invoke(main, shlex.split(Template(args).substitute(world)))
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.output.splitlines()
    assert lines and lines[0].startswith("Error: "), result.output
    assert len([line for line in lines if line.startswith("Error: ")]) == 1, result.output
    return result.exit_code, lines[0]


REG = "--registry $registry"
OUT = "--out $root/out"
USAGE = 2  # click's exit code for bad usage; every other failure exits 1

BAD_INPUTS: list[tuple[str, int, str]] = [
    # ---- recipe: numbers that are not finite, not numbers, or out of range --------------------------------
    (f"{NO_DATA} train.lr=1e400", 1, f"Error: {RECIPE}: train.lr: input should be a finite number (got '1e400')"),
    (f"{NO_DATA} train.lr=.inf", 1, f"Error: {RECIPE}: train.lr: input should be a finite number (got inf)"),
    (f"{NO_DATA} train.lr=-.inf", 1, f"Error: {RECIPE}: train.lr: input should be a finite number (got -inf)"),
    (f"{NO_DATA} train.lr=nan", 1, f"Error: {RECIPE}: train.lr: input should be a finite number (got 'nan')"),
    (f"{NO_DATA} train.weight_decay=.inf", 1,
     f"Error: {RECIPE}: train.weight_decay: input should be a finite number (got inf)"),
    (f"{NO_DATA} train.max_grad_norm=.inf", 1,
     f"Error: {RECIPE}: train.max_grad_norm: input should be a finite number (got inf)"),
    (f"{NO_DATA} adapter.lora_alpha=.nan", 1,
     f"Error: {RECIPE}: adapter.lora_alpha: input should be a finite number (got nan)"),
    (f"{NO_DATA} adapter.r=99999999999999999999", 1,
     f"Error: {RECIPE}: adapter.r: must be at most 2147483647 (got 99999999999999999999)"),
    (f"{NO_DATA} adapter.r=5000", 1, f"Error: {RECIPE}: adapter.r: input should be less than or equal to 4096 (got 5000)"),
    (f"{NO_DATA} adapter.r=0", 1, f"Error: {RECIPE}: adapter.r: input should be greater than or equal to 1 (got 0)"),
    (f"{NO_DATA} adapter.r=2.5", 1,
     f"Error: {RECIPE}: adapter.r: input should be a valid integer, got a number with a fractional part (got 2.5)"),
    (f"{NO_DATA} adapter.r=true", 1, f"Error: {RECIPE}: adapter.r: must be a number, not true"),
    (f"{NO_DATA} train.epochs=true", 1, f"Error: {RECIPE}: train.epochs: must be a number, not true"),
    (f"{NO_DATA} train.batch_size=false", 1, f"Error: {RECIPE}: train.batch_size: must be a number, not false"),
    (f"{NO_DATA} adapter.lora_dropout=true", 1, f"Error: {RECIPE}: adapter.lora_dropout: must be a number, not true"),
    (f"{NO_DATA} train.batch_size=1000000000000000000000000000000", 1,
     f"Error: {RECIPE}: train.batch_size: must be at most 2147483647 (got 1000000000000000000000000000000)"),
    (f"{NO_DATA} train.batch_size=1.0e+30", 1, f"Error: {RECIPE}: train.batch_size: must be at most 2147483647 (got 1e+30)"),
    (f"{NO_DATA} train.batch_size=100000", 1,
     f"Error: {RECIPE}: train.batch_size: input should be less than or equal to 65536 (got 100000)"),
    (f"{NO_DATA} train.batch_size=sixteen", 1,
     f"Error: {RECIPE}: train.batch_size: input should be a valid integer, unable to parse string as an integer "
     "(got 'sixteen')"),
    (f"{NO_DATA} train.epochs=0", 1, f"Error: {RECIPE}: train.epochs: input should be greater than 0 (got 0)"),
    (f"{NO_DATA} train.max_steps=0", 1,
     f"Error: {RECIPE}: train.max_steps: input should be greater than or equal to 1 (got 0)"),
    (f"{NO_DATA} train.seed=-1", 1, f"Error: {RECIPE}: train.seed: input should be greater than or equal to 0 (got -1)"),
    (f"{NO_DATA} train.warmup_ratio=1", 1, f"Error: {RECIPE}: train.warmup_ratio: input should be less than 1 (got 1)"),
    (f"{NO_DATA} data.eval_fraction=1", 1, f"Error: {RECIPE}: data.eval_fraction: input should be less than 1 (got 1)"),
    (f"{NO_DATA} data.max_length=4", 1,
     f"Error: {RECIPE}: data.max_length: input should be greater than or equal to 8 (got 4)"),
    # ---- recipe: choices, unknown keys, names ------------------------------------------------------------
    (f"{NO_DATA} adapter.target_modules=query", 1,
     f"Error: {RECIPE}: adapter.target_modules: use all-linear or a list of module names such as [query, value] "
     "(got 'query'); for one module write [query]"),
    (f"{NO_DATA} adapter.method=qlora", 1, f"Error: {RECIPE}: adapter.method: 'qlora' is not a method; use lora or adalora"),
    (f"{NO_DATA} quantization.bits=3", 1, f"Error: {RECIPE}: quantization.bits: input should be 4 or 8 (got 3)"),
    (f"{NO_DATA} base.dtype=float64", 1,
     f"Error: {RECIPE}: base.dtype: input should be 'float32', 'bfloat16' or 'float16' (got 'float64')"),
    (f"{NO_DATA} data.format=xlsx", 1,
     f"Error: {RECIPE}: data.format: input should be 'auto', 'csv', 'tsv', 'json', 'jsonl', 'parquet', 'txt' or 'conll' "
     "(got 'xlsx')"),
    (f"{NO_DATA} adapter.lora_alfa=8", 1, f"Error: {RECIPE}: adapter.lora_alfa: unknown key; did you mean `lora_alpha`?"),
    (f"{NO_DATA} adapter.init_r=8", 1,
     f"Error: {RECIPE}: adapter.init_r: unknown key; `init_r` is an adalora option: set method: adalora"),
    (f"{NO_DATA} trainer.epochs=1", 1, f"Error: {RECIPE}: trainer: unknown key; did you mean `train`?"),
    (f"{NO_DATA} wandb.project=x", 1, f"Error: {RECIPE}: wandb: unknown key; remove it"),
    (f"{NO_DATA} \"base.model=''\"", 1,
     f"Error: {RECIPE}: base.model: empty; name a packaged model (minilm, smollm2-135m), a local model folder or a "
     "hub id"),
    (f"{NO_DATA} output.name=base", 1,
     f"Error: {RECIPE}: output.name: adapter name 'base' is reserved: it stands for the base model without adapter "
     "in predict, generate and serving; choose another name"),
    (f"{NO_DATA} output.name=../x", 1,
     f"Error: {RECIPE}: output.name: adapter name '../x' is not allowed: use letters, digits, '.', '_' and '-', "
     "start with a letter or digit, no path separators or '..', at most 128 characters"),
    (f"{NO_DATA} train.epochs", 1, "Error: --set 'train.epochs': expected KEY=VALUE, for example --set train.epochs=2"),
    (f"{NO_DATA} train.epochs.max=2", 1,
     "Error: --set train.epochs.max=2: train.epochs is a value, not a section; set train.epochs=... instead"),
    (f"{NO_DATA} train.epochs=true --set adapter.r=0 --set train.lr=.inf", 1,
     f"Error: {RECIPE}: 3 problems: adapter.r: input should be greater than or equal to 1 (got 0); train.epochs: "
     "must be a number, not true; train.lr: input should be a finite number (got inf)"),
    # ---- recipe files: encoding, syntax, extends ---------------------------------------------------------
    ("validate $root/binary.yaml", 1, "Error: $root/binary.yaml is a binary file, not a YAML recipe; name the "
                                      "recipe's .yaml file"),
    ("validate $root/latin1.yaml", 1, "Error: $root/latin1.yaml: not UTF-8 text (byte 0xe9 on line 2); save the "
                                      "recipe as UTF-8"),
    ("validate $root/list.yaml", 1, "Error: $root/list.yaml: a recipe must be a mapping of sections, found list"),
    ("validate $root/syntax.yaml", 1, "Error: $root/syntax.yaml: not valid YAML at line 3: expected <block end>, but "
                                      "found '<block mapping start>'"),
    ("validate $root/empty.yaml", 1, "Error: $root/empty.yaml: 4 problems: base: required, but missing; task: required, "
                                     "but missing; data: required, but missing; output: required, but missing"),
    ("validate $root/gone.yaml", 1, "Error: recipe file $root/gone.yaml does not exist; check the path"),
    ("validate $root/folder.yaml", USAGE,
     "Error: Invalid value for 'RECIPE': File '$root/folder.yaml' is a directory (see peftkit validate --help)"),
    ("validate $root/ext-binary.yaml", 1, "Error: $root/binary.yaml is a binary file, not a YAML recipe; name the "
                                          "recipe's .yaml file"),
    ("validate $root/ext-folder.yaml", 1,
     "Error: $root/ext-folder.yaml: extends: folder.yaml is a folder ($root/folder.yaml); name the parent recipe file"),
    ("validate $root/ext-missing.yaml", 1,
     "Error: $root/ext-missing.yaml: extends: gone.yaml does not exist (looked for $root/gone.yaml); fix the path"),
    ("validate $root/loop-a.yaml", 1, "Error: recipe extends itself in a loop: $root/loop-a.yaml -> $root/loop-b.yaml "
                                      "-> $root/loop-a.yaml; remove one of the extends"),
    ("validate $root/ext-number.yaml", 1,
     "Error: $root/ext-number.yaml: extends must be a path to a recipe file, found 3"),
    # ---- data: files, columns, labels, rows --------------------------------------------------------------
    (f"validate {RECIPE} --set data.train=$root/ragged.tsv", 1,
     "Error: data.train: $root/ragged.tsv: row 4 has no label (column 'label' is empty there, or the row is short); "
     "fill it in or remove the row"),
    (f"validate {RECIPE} --set data.train=$root/empty-label.tsv", 1,
     "Error: data.train: $root/empty-label.tsv: row 6 has no label (column 'label' is empty there, or the row is "
     "short); fill it in or remove the row"),
    (f"validate {RECIPE} --set data.eval=$root/empty-label.tsv", 1,
     "Error: data.eval: $root/empty-label.tsv: row 6 has no label (column 'label' is empty there, or the row is "
     "short); fill it in or remove the row"),
    (f"validate {RECIPE} --set data.train=$root/empty-text.tsv", 1,
     "Error: data.train: $root/empty-text.tsv: row 2 has no text (column 'sentence' is empty there, or the row is "
     "short); fill it in or remove the row"),
    (f"validate {RECIPE} --set data.train=$root/empty-label.json --set data.eval=null", 1,
     "Error: data.train: $root/empty-label.json: row 2 has no label (column 'label' is empty there, or the row is "
     "short); fill it in or remove the row"),
    (f"validate {RECIPE} --set data.train=$root/data.xyz", 1,
     "Error: data.train: $root/data.xyz ends in .xyz, which is not a data format peftkit reads; give a csv, tsv, "
     "json, jsonl, parquet, txt or conll file, or set data.format"),
    (f"validate {RECIPE} --set data.train=$root/empty.csv", 1, "Error: data.train: $root/empty.csv has no rows; it is empty"),
    (f"validate {RECIPE} --set data.train=$root/header.csv", 1,
     "Error: data.train: $root/header.csv has no rows below its header"),
    (f"validate {RECIPE} --set data.train=$root/wide.csv --set data.eval=null", 1,
     "Error: data.train: could not read $root/wide.csv as csv: Error tokenizing data. C error: Expected 2 fields in "
     "line 3, saw 3; check data.format and data.header"),
    (f"validate {RECIPE} --set data.train=$root/broken.json", 1,
     "Error: data.train: could not read $root/broken.json as json: Expected object or value at position 33; "
     "check data.format and data.header"),
    (f"validate {RECIPE} --set data.train=$root/one-label.tsv --set data.eval=null", 1,
     "Error: data.train: only one label ('1') in the training data; classification needs at least two"),
    (f"validate {RECIPE} --set data.eval=$root/unknown-label.tsv", 1,
     "Error: $root/unknown-label.tsv: row 6 has label '7', which the training data does not have (0, 1); fix that "
     "row or list the label in task.labels"),
    (f"validate {RECIPE} --set data.train=$root/data-folder", 1,
     "Error: data.train: $root/data-folder is a folder; name a data file"),
    (f"validate {RECIPE} --set data.train=$root/gone.tsv", 1,
     "Error: data.train: file $root/gone.tsv does not exist; check the path"),
    (f"validate {RECIPE} --set data.columns.text=review", 1,
     "Error: data.columns.text: column 'review' is not in $tiny/cls_train.tsv (its columns: sentence, label); fix "
     "the name"),
    (f"validate {RECIPE} --set data.header=false", 1,
     "Error: data.column_names: $tiny/cls_train.tsv has no header; list its columns in data.column_names"),
    (f"validate {RECIPE} --set data.column_names=[a,b]", 1,
     "Error: data.column_names: names columns of a header-less file; set data.header: false"),
    (f"validate {RECIPE} --set data.header=false --set data.column_names=[a,b,c]", 1,
     "Error: data.column_names: $tiny/cls_train.tsv has 2 columns but data.column_names names 3; name every column, "
     "in order"),
    (f"validate {RECIPE} --set base.model=$root/no-model", 1,
     "Error: base.model: folder $root/no-model does not exist; check the path"),
    # ---- CLI options -------------------------------------------------------------------------------------
    (f"export tiny {OUT} --check -1 {REG}", USAGE,
     "Error: Invalid value for '--check': -1 is not in the range x>=0 (see peftkit export --help)"),
    (f"merge tiny {OUT} --rows -5 {REG}", USAGE,
     "Error: Invalid value for '--rows': -5 is not in the range x>=1 (see peftkit merge --help)"),
    (f"adalora to-lora tiny --name t2 --check -1 {REG}", USAGE,
     "Error: Invalid value for '--check': -1 is not in the range x>=0 (see peftkit adalora to-lora --help)"),
    (f"combine tiny tiny --weights 0.5,0.5 --svd-rank 0 --name c {REG}", USAGE,
     "Error: Invalid value for '--svd-rank': 0 is not in the range x>=1 (see peftkit combine --help)"),
    (f"predict hello --adapter tiny --batch-size 0 {REG}", USAGE,
     "Error: Invalid value for '--batch-size': 0 is not in the range x>=1 (see peftkit predict --help)"),
    ("predict hello", USAGE, "Error: Missing option '--adapter' (see peftkit predict --help)"),
    ("generate --adapter tiny", USAGE, "Error: Missing argument 'PROMPTS...' (see peftkit generate --help)"),
    ("eval tiny", USAGE, "Error: Missing option '--data' (see peftkit eval --help)"),
    ("trian r.yaml", USAGE, "Error: No such command 'trian'. Did you mean 'train'? (see peftkit --help)"),
    (f"train {RECIPE} --resum", USAGE,
     "Error: No such option '--resum'. Did you mean '--resume'? (see peftkit train --help)"),
    (f"predict hello --adapter tiny --input $root/good.tsv {REG}", USAGE,
     "Error: give texts on the command line or --input FILE (one of the two) (see peftkit predict --help)"),
    (f"predict hello --adapter base {REG}", USAGE,
     "Error: name at least one registered adapter with --adapter (see peftkit predict --help)"),
    (f"predict hello --adapter tiny --column text {REG}", 1, "Error: --column 'text': write ROLE=COLUMN, e.g. --column "
                                                             "text=review"),
    (f"predict hello --adapter tinyy {REG}", 1, "Error: no adapter named 'tinyy' in $registry/; did you mean tiny?"),
    (f"combine tiny tiny --weights nan,inf --name c {REG}", 1,
     "Error: --weights: nan is not a finite number; give finite weights, e.g. 0.5,0.5"),
    (f"combine tiny tiny --weights 0.5,inf --name c {REG}", 1,
     "Error: --weights: inf is not a finite number; give finite weights, e.g. 0.5,0.5"),
    (f"combine tiny tiny --weights 0.5,abc --name c {REG}", 1,
     "Error: --weights: '0.5,abc' is not a comma-separated list of numbers, e.g. 0.5,0.5"),
    (f"combine tiny --weights 1 --name c {REG}", 1, "Error: combine needs two or more adapters (an adapter may be "
                                                    "named twice)"),
    (f"combine tiny tiny --weights 1 --name c {REG}", 1,
     "Error: --weights: 1 weights for 2 adapters; give one weight per adapter, e.g. --weights 0.5,0.5"),
    (f"combine tiny tiny --weights 0.5,0.5 --density 0.5 --name c {REG}", 1,
     "Error: --density: linear does not prune; drop --density or use ties, dare_linear, dare_ties or magnitude_prune"),
    (f"merge tiny {OUT} --dtype fp64 {REG}", 1,
     "Error: --dtype: unknown dtype 'fp64'; use one of: fp32, bf16, fp16 (or float32, bfloat16, float16)"),
    (f"merge tiny {OUT} --quantize q3 {REG}", 1, "Error: --quantize: unknown type 'q3'; use one of: nf4, fp4, int8"),
    (f"merge tiny --out $registry {REG}", 1,
     "Error: --out $registry would replace $registry/tiny, the adapter being read; choose another --out"),
    (f"export tiny --format onnx {OUT} {REG}", 1, "Error: --format: unknown format 'onnx'; use one of: peft, gguf"),
    # ---- registry names and adapters ---------------------------------------------------------------------
    (f"combine tiny tiny --weights 0.5,0.5 --name base {REG}", 1,
     "Error: adapter name 'base' is reserved: it stands for the base model without adapter in predict, generate and "
     "serving; choose another name"),
    (f"combine tiny tiny --weights 0.5,0.5 --name ../up {REG}", 1,
     "Error: adapter name '../up' is not allowed: use letters, digits, '.', '_' and '-', start with a letter or "
     "digit, no path separators or '..', at most 128 characters"),
    (f"combine tiny tiny --weights 0.5,0.5 --name tiny {REG}", 1,
     "Error: adapter 'tiny' already exists in $registry/; choose another --name or pass --overwrite"),
    (f"combine tiny tiny --weights 0.5,0.5 --name half --registry $root/broken", 1,
     "Error: $root/broken/half exists but is not a complete adapter (no peftkit.json); remove it with `peftkit "
     "adapters rm half --registry $root/broken`, or choose another --name or pass --overwrite"),
    (f"adalora to-lora tiny --name base {REG}", 1,
     "Error: tiny is a lora adapter; `adalora to-lora` converts AdaLoRA adapters only"),
    (f"adapters show tinyy {REG}", 1, "Error: no adapter named 'tinyy' in $registry/; did you mean tiny?"),
    (f"adapters rm zzz {REG}", 1, "Error: no adapter named 'zzz' in $registry/; run `peftkit adapters list` "
                                      "to see them"),
    (f"adapters rm ../x {REG}", 1, "Error: adapter name '../x' is not allowed: use letters, digits, '.', '_' and '-', "
                                   "start with a letter or digit, no path separators or '..', at most 128 characters"),
    ("adapters list --registry $root/case.py", 1,
     "Error: registry $root/case.py is a file, not a folder; point --registry (or PEFTKIT_REGISTRY, "
     "output.registry) at the folder that holds the adapters"),
    ("adapters show tiny --registry $root/case.py", 1,
     "Error: registry $root/case.py is a file, not a folder; point --registry (or PEFTKIT_REGISTRY, "
     "output.registry) at the folder that holds the adapters"),
    (f"train {RECIPE}", 1, "Error: output.name: adapter 'tiny' already exists in $registry/; choose another name "
                           "(--set output.name=NEW) or pass --overwrite to replace it"),
    (f"train {RECIPE} --set output.registry=$root/broken --set output.name=half", 1,
     "Error: output.name: $root/broken/half exists but is not a complete adapter (no peftkit.json); remove it with "
     "`peftkit adapters rm half --registry $root/broken`, or choose another name (--set output.name=NEW) or pass "
     "--overwrite to replace it"),
    (f"train {RECIPE} --set output.registry=$root/case.py --set output.name=new", 1,
     "Error: registry $root/case.py is a file, not a folder; point --registry (or PEFTKIT_REGISTRY, output.registry) "
     "at the folder that holds the adapters"),
    (f"eval tiny --data $root/empty-label.tsv {REG}", 1,
     "Error: --data: $root/empty-label.tsv: row 6 has no label (column 'label' is empty there, or the row is short); "
     "fill it in or remove the row"),
]


@pytest.mark.parametrize("args, code, expected", BAD_INPUTS, ids=[row[0][:60] for row in BAD_INPUTS])
def test_bad_input_gets_one_line(world: dict[str, str], args: str, code: int, expected: str):
    assert first_line(world, args) == (code, Template(expected).substitute(world))


def test_the_table_is_large_and_has_no_repeats():
    assert len(BAD_INPUTS) >= 60
    assert len({args for args, _, _ in BAD_INPUTS}) == len(BAD_INPUTS)


def test_a_second_run_of_the_same_name_is_refused_before_training(world: dict[str, str]):
    with Registry(world["registry"]).reserve("second", "output.name"):  # as a run in another process holds it
        result = CliRunner().invoke(main, ["train", f"{world['root']}/r.yaml", "--set", "output.name=second"])
    assert result.exit_code == 1
    assert result.output.splitlines() == [  # nothing else: no base loaded, no step trained
        f"Error: output.name: adapter 'second' is being written into {world['registry']}/ by another process "
        f"(pid {os.getpid()}); wait for it to finish, or choose another name"]


def test_show_of_a_corrupt_adapter_exits_non_zero(world: dict[str, str], tmp_path: Path):
    shutil.copytree(Path(world["registry"]) / "tiny", tmp_path / "tiny")
    weights = tmp_path / "tiny" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    result = CliRunner().invoke(main, ["adapters", "show", "tiny", "--registry", str(tmp_path)])
    lines = result.output.splitlines()
    assert result.exit_code == 1 and lines[1].startswith("files: FAILED: ")
    assert lines[-1] == (f"Error: tiny: {weights} is corrupt (its checksum differs from the one saved); restore it "
                         "or retrain")
