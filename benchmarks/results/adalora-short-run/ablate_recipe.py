"""One AdaLoRA (or LoRA) run from a recipe with overrides, printed as one line (issue 14's second ablation).

    python ablate_recipe.py RECIPE NAME "{adapter overrides}" "{train overrides}" "{data overrides}"
    LAMBDA0=0.1 python ablate_recipe.py ...     # the LoRA-like start: P = 0, lambda = 0.1, Q orthonormal

RECIPE is a path, or a name under the repository's recipes/ (data paths are read from the repository root).
Overrides are Python literals. The squared and unsquared regularizers are chosen with
``{'orth_reg_form': 'norm'}`` in the adapter overrides (earlier lines in runs-2026-12-02.txt that say ``sq``
patched the squared form in before it was peftkit's default).
"""
import ast
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
import torch  # noqa: E402

import peftkit.adalora as adalora  # noqa: E402
import peftkit.build as build  # noqa: E402
from peftkit.recipe import build_recipe, read_recipe_tree  # noqa: E402
from peftkit.training import train  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
if os.environ.get("LAMBDA0"):
    start, orthogonal = float(os.environ["LAMBDA0"]), adalora.orthogonal_init

    def lora_like(model, adapter_name="default"):
        count = orthogonal(model, adapter_name)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(f"lora_B.{adapter_name}"):
                    p.zero_()
                if name.endswith(f"lora_E.{adapter_name}"):
                    p.fill_(start)
        return count

    build.orthogonal_init = lora_like
os.chdir(REPO)
out = Path(tempfile.mkdtemp(prefix="adalora-ablate-"))
recipe, name = sys.argv[1], sys.argv[2]
adapter_over, train_over, data_over = (ast.literal_eval(s) for s in sys.argv[3:6])
data = read_recipe_tree(Path(recipe) if Path(recipe).is_file() else REPO / "recipes" / recipe)
data["data"] = {**data["data"], **data_over}
data["train"] = {**data.get("train", {}), "progress": False, **train_over}
data["adapter"] = {**data["adapter"], **adapter_over}
data["output"] = {**data["output"], "registry": str(out / "adapters"), "runs": str(out / "runs"), "name": "a"}
started = time.time()
result = train(build_recipe(data), echo=lambda line: None)
print(name, os.environ.get("LAMBDA0") or "", adapter_over, train_over, data_over,
      "acc %.4f f1 %.4f" % (result.metrics["accuracy"], result.metrics["macro_f1"]),
      "%.0fs" % (time.time() - started), flush=True)
