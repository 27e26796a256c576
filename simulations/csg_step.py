"""Issue 25 diagnostic: how far one local epoch moves the filters, plain vs CSG variants, all from the
same starting filters (the CSG model's generated ones; ``balanced`` generates the same filters too).

Prints the relative filter change |W_new - W_old| / |W_old| (overall and per layer) per variant and
writes it as JSON.

Usage::

    FEDCSG_DATA_DIR=/work/shared/data python3 simulations/csg_step.py 1000 docs/csg-step.json
"""

import json
import sys
import time

import torch

from fedcsg.data.batches import TensorBatches
from fedcsg.data.readers import load_split
from fedcsg.nn.csg_factors import factor_lr_scales
from fedcsg.nn.csgify import materialize
from fedcsg.nn.models import build_model, default_csg_config
from fedcsg.nn.step import conv_filters, relative_change
from fedcsg.nn.training import make_optimizer, set_seed, train_epoch

LR = 0.05
VARIANTS = {  # name -> (csg init or None for plain, codes lr scale)
    "plain": ("kaiming", None),
    "csg": ("kaiming", 1.0),
    "csg codes-lr-scale 0.1": ("kaiming", 0.1),
    "csg balanced": ("balanced", 1.0),
}

torch.set_num_threads(1)
N, OUT = int(sys.argv[1]), sys.argv[2]
train = load_split("cifar10", "train", None, limit=N, seed=0)
results = {}
for name, (init, codes_scale) in VARIANTS.items():
    set_seed(0)
    model = build_model("resnet20", csg=default_csg_config("resnet20", init=init))
    if codes_scale is None:
        model, scales = materialize(model), {}
    else:
        scales = factor_lr_scales(model, codes_scale, 1.0)
    before = conv_filters(model)
    optimizer = make_optimizer(model, LR, 0.9, 5e-4, scales)
    batches = TensorBatches(train, 64, shuffle=True, augment=True, seed=0)
    t = time.time()
    stats = train_epoch(model, batches, optimizer, "cpu")
    step = relative_change(before, conv_filters(model))
    results[name] = {"overall": step.overall, "per_layer": step.per_layer, "train_loss": stats.loss}
    print(f"{name:24s} overall {step.overall:.3f}  loss {stats.loss:.3f}  {time.time() - t:.0f}s", flush=True)

layers = list(results["plain"]["per_layer"])
print("\n| layer | " + " | ".join(results) + " |")
print("| --- |" + " ---: |" * len(results))
print("| **overall** | " + " | ".join(f"**{r['overall']:.3f}**" for r in results.values()) + " |")
for layer in layers:
    print(f"| {layer} | " + " | ".join(f"{r['per_layer'][layer]:.3f}" for r in results.values()) + " |")
with open(OUT, "w") as f:
    json.dump({"images": N, "lr": LR, "batch_size": 64, "variants": results}, f, indent=1)
