import sys, time, os
os.environ["HF_HUB_OFFLINE"] = "1"
from pathlib import Path
from peftkit.recipe import build_recipe, read_recipe_tree
from peftkit.training import train
REPO = Path("/work/main"); os.chdir(REPO)
name, adapter_over, train_over = sys.argv[1], eval(sys.argv[2]), eval(sys.argv[3])
data = read_recipe_tree(REPO / "recipes" / "sst2-adalora.yaml")
data["data"] = {**data["data"], "max_train_samples": 500, "max_eval_samples": 200}
data["train"] = {**data.get("train", {}), "epochs": 2, "batch_size": 16, "progress": False, **train_over}
data["adapter"] = {**data["adapter"], **adapter_over}
data["output"] = {**data["output"], "registry": f"/tmp/m/abl/{name}/adapters", "runs": f"/tmp/m/abl/{name}/runs", "name": "a"}
t = time.time(); r = train(build_recipe(data), echo=lambda l: None)
print(name, adapter_over, train_over, "acc %.3f f1 %.3f" % (r.metrics["accuracy"], r.metrics["macro_f1"]), "%.0fs" % (time.time() - t), flush=True)
