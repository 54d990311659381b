"""One 64-step AdaLoRA run on 500 SST-2 rows with overrides: python ablate.py NAME "{adapter}" "{train}"."""
import ast, os, sys, tempfile, time
os.environ["HF_HUB_OFFLINE"] = "1"
from pathlib import Path
from peftkit.recipe import build_recipe, read_recipe_tree
from peftkit.training import train
REPO = Path(__file__).resolve().parents[3]; os.chdir(REPO)  # recipes name their data from the root
out = Path(tempfile.mkdtemp(prefix="adalora-ablate-"))
name, adapter_over, train_over = sys.argv[1], ast.literal_eval(sys.argv[2]), ast.literal_eval(sys.argv[3])
data = read_recipe_tree(REPO / "recipes" / "sst2-adalora.yaml")
data["data"] = {**data["data"], "max_train_samples": 500, "max_eval_samples": 200}
data["train"] = {**data.get("train", {}), "epochs": 2, "batch_size": 16, "progress": False, **train_over}
data["adapter"] = {**data["adapter"], **adapter_over}
data["output"] = {**data["output"], "registry": str(out / "adapters"), "runs": str(out / "runs"), "name": "a"}
t = time.time(); r = train(build_recipe(data), echo=lambda l: None)
print(name, adapter_over, train_over, "acc %.3f f1 %.3f" % (r.metrics["accuracy"], r.metrics["macro_f1"]), "%.0fs" % (time.time() - t), flush=True)
