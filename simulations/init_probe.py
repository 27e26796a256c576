"""Central probe of the CSG init (the numbers in fedcsg/csg.py's docstring): ResNet-20 plain, and CSG with
the paper's init, codes rescaled to Kaiming std (``kaiming``), or a fixed per-layer output scale (``fixed``).

Usage::

    python3 simulations/init_probe.py 4000 3 \\
        plain,paper/train,kaiming/train,fixed/train,paper/frozen,kaiming/frozen,fixed/frozen
"""

import sys
import time

import torch

from fedcsg.data.batches import TensorBatches
from fedcsg.data.readers import load_split
from fedcsg.nn.csg import CSGConv2d, csg_layers
from fedcsg.nn.csgify import kaiming_std
from fedcsg.nn.models import build_model, default_csg_config
from fedcsg.nn.training import evaluate, make_optimizer, set_seed, step_lr, train_epoch

torch.set_num_threads(1)
N, E = int(sys.argv[1]), int(sys.argv[2])
train = load_split("cifar10", "train", None, limit=N, seed=0)
test = load_split("cifar10", "test", None, limit=1000, seed=0)
tb = TensorBatches(test, 256)
orig = CSGConv2d.weight


def fixed(self):
    return orig.fget(self) * self.__dict__.get("_alpha", 1.0)


for arm in sys.argv[3].split(","):
    set_seed(0)
    CSGConv2d.weight = orig
    if arm == "plain":
        model = build_model("resnet20")
    else:
        kind, frozen = arm.split("/")
        init = "kaiming" if kind == "kaiming" else "paper"
        model = build_model("resnet20", csg=default_csg_config("resnet20", frozen=frozen == "frozen", init=init))
        if kind == "fixed":
            with torch.no_grad():
                for _, layer in csg_layers(model):
                    layer.__dict__["_alpha"] = kaiming_std(layer) / layer.weight.std().item()
            CSGConv2d.weight = property(fixed)
    r0 = evaluate(model, tb, "cpu")
    opt = make_optimizer(model, 0.05)
    batches = TensorBatches(train, 128, shuffle=True, augment=True, seed=0)
    accs = []
    t = time.time()
    for e in range(E):
        for g in opt.param_groups:
            g["lr"] = step_lr(0.05, e, E, "cosine")
        train_epoch(model, batches, opt, "cpu")
        accs.append(round(evaluate(model, tb, "cpu").accuracy, 4))
    print(f"{arm:16s} round0 loss {r0.loss:.4g}  test acc per epoch {accs}  {time.time() - t:.0f}s", flush=True)
