"""python replay_window.py SWEEP_RECIPE.yaml SEED old|new: one peftkit run with the old fixed window or the new rule."""
import os, sys, tempfile, time, yaml
os.environ["HF_HUB_OFFLINE"]="1"
from pathlib import Path
import peftkit.data as D
if sys.argv[3] == "old":
    D.window_batches = lambda n, b: 64
from peftkit.recipe import build_recipe
from peftkit.training import train
d = yaml.safe_load(open(sys.argv[1])); out = Path(tempfile.mkdtemp())
d["train"]["seed"] = int(sys.argv[2]); d["output"].update(registry=str(out/"a"), runs=str(out/"r"), name="x")
t=time.time(); r = train(build_recipe(d), echo=lambda l: None)
print(Path(sys.argv[1]).name, sys.argv[2], sys.argv[3], "acc %.4f" % r.metrics["accuracy"], "%.0fs" % (time.time()-t), flush=True)
