"""How steps run (fedcsg.nn.execution): compiled CSG and FedPara equal to eager with one graph per model
and shape, channels-last without a payload change, precisions refused or honoured, compile's auto rule."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

from fedcsg.data.batches import TensorBatches
from fedcsg.data.readers import ImageData
from fedcsg.data.registry import get_spec
from fedcsg.nn import execution as execution_module
from fedcsg.nn.csg import CSGConv2d, SliceShape, SliceSpec, csg_layers
from fedcsg.nn.csgify import CSGConfig, csgify
from fedcsg.nn.execution import CompileCost, Execution, compile_pays, precision_problem
from fedcsg.nn.fedpara import fedparafy
from fedcsg.nn.training import make_optimizer, train_epoch
from fedcsg.spec.config import RunConfig
from fedcsg.spec.experiments import load_experiment
from fedcsg.wire.payload import PayloadLayout, model_payload

CPU = torch.device("cpu")


class TinyCNN(nn.Module):
    """Three 3x3 convs (the first stays ordinary), BatchNorm and a classifier: small enough to compile
    in seconds, with two converted convs of different shapes sharing one generator."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, stride=2, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1, bias=True)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.stem(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(self.conv3(x).mean(dim=(2, 3)))


def tiny_cnn(kind: str) -> nn.Module:
    torch.manual_seed(0)
    model = TinyCNN()
    if kind == "csg":
        csgify(model, CSGConfig(slices=(SliceSpec(SliceShape(8, 8, 3), 6),)))
    elif kind == "fedpara":
        fedparafy(model, 0.5)
    return model


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["csg", "fedpara"])
def test_compiled_model_equals_eager_in_one_graph(kind):
    # float64, so that the comparison sees the computation and not fp32 rounding: the compiled graph
    # must compute exactly what eager computes (forward and every gradient), as one graph, without
    # a graph break or a recompile per layer.
    torch._dynamo.reset()
    counters.clear()
    model = tiny_cnn(kind).double().train()
    compiled = Execution(compile=True).compiled(model, CPU)
    x = torch.randn(6, 1, 12, 12, dtype=torch.float64)
    out = compiled(x)
    out.square().sum().backward()
    got = _grads(model)
    model.zero_grad()
    expected = model(x)
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    assert set(got) == set(_grads(model)) and len(got) == len(list(model.parameters()))
    for name, grad in _grads(model).items():
        torch.testing.assert_close(got[name], grad, rtol=1e-10, atol=1e-12, msg=name)
    for _ in range(2):  # further steps of the same shape reuse the graph
        compiled(x).sum().backward()
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]


def test_train_epoch_compiles_once_and_runs_a_smaller_last_batch_eagerly():
    torch._dynamo.reset()
    counters.clear()
    model = tiny_cnn("csg")
    execution = Execution(compile=True, channels_last=True)
    execution.place(model, CPU)
    spec = get_spec("fashion-mnist")
    data = ImageData(torch.randint(0, 256, (20, 1, 28, 28), dtype=torch.uint8), torch.randint(0, 3, (20,)), spec)
    batches = TensorBatches(data, 8, shuffle=True, seed=0)  # 8 + 8 + 4
    optimizer = make_optimizer(model, 0.05)
    compiled = execution.compiled(model, CPU)
    for _ in range(2):
        stats = train_epoch(model, batches, optimizer, CPU, execution, compiled)
        assert stats.num_examples == 20 and np.isfinite(stats.loss)
    assert counters["stats"]["unique_graphs"] == 1  # batch 8 compiled once; the batch of 4 ran eagerly


def test_channels_last_leaves_the_payload_bit_identical_and_lays_out_generated_filters():
    model = tiny_cnn("csg")
    layout = PayloadLayout.for_model(model, "per-tensor")
    before = model_payload(model, layout)
    x = torch.rand(2, 1, 12, 12)
    model.eval()
    with torch.no_grad():
        reference = model(x)
    Execution(channels_last=True).place(model, CPU)
    after = model_payload(model, layout)
    assert list(before) == list(after)
    for key in before:
        assert before[key].numpy().tobytes() == after[key].numpy().tobytes(), key
    for _, layer in csg_layers(model):
        assert layer.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.stem.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(model(x.contiguous(memory_format=torch.channels_last)), reference)


def test_a_precision_the_hardware_lacks_is_refused_in_one_line(monkeypatch):
    monkeypatch.setitem(execution_module.CPU_SUPPORTS, "bf16", lambda: False)
    problem = precision_problem("bf16", CPU)
    assert problem == "precision = 'bf16' is not supported by this CPU (no bf16 instructions): use fp32"
    with pytest.raises(ValueError, match="^precision = 'bf16' is not supported by this CPU"):
        Execution(precision="bf16").check(CPU)
    assert precision_problem("fp32", CPU) == ""
    assert "not accepted" in precision_problem("fp8", CPU)
    with pytest.raises(ValueError, match="precision = 'fp8' is not accepted: one of fp32, bf16, fp16 is"):
        RunConfig(precision="fp8")


def test_bf16_is_honoured_where_the_cpu_has_it_and_refused_where_not():
    model = tiny_cnn("csg")
    execution = Execution(precision="bf16")
    if not execution_module.CPU_SUPPORTS["bf16"]():
        with pytest.raises(ValueError, match="not supported by this CPU"):
            execution.check(CPU)
        return
    execution.check(CPU)
    layer = next(m for m in model.modules() if isinstance(m, CSGConv2d))
    seen = {}
    layer.register_forward_hook(lambda m, inputs, output: seen.update(conv=output.dtype))
    generator = model.csg_generators["3x3"]
    generator.register_forward_hook(lambda m, inputs, output: seen.update(generated=output.dtype))
    optimizer = make_optimizer(model, 0.05)
    with execution.autocast(CPU):
        logits = model(torch.rand(4, 1, 12, 12))
        loss = F.cross_entropy(logits, torch.tensor([0, 1, 2, 0]))
    loss.backward()
    optimizer.step()
    assert seen == {"conv": torch.bfloat16, "generated": torch.float32}  # conv in bf16, generation in fp32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(s["momentum_buffer"].dtype == torch.float32 for s in optimizer.state.values())
    layout = PayloadLayout.for_model(model, "per-tensor")
    payload, fresh = model_payload(model, layout), model_payload(tiny_cnn("csg"), layout)
    assert {k: payload[k].dtype for k in payload} == {k: fresh[k].dtype for k in fresh}  # float32, int64 counters


def test_fp16_scales_the_loss_and_fp32_does_not():
    assert isinstance(Execution(precision="fp16").grad_scaler(CPU), torch.amp.GradScaler)
    assert Execution().grad_scaler(CPU) is None
    assert Execution(precision="bf16").grad_scaler(CPU) is None


def test_compile_auto_compiles_where_the_measured_warm_up_pays_back(monkeypatch):
    # As measured on this project's CPU the compiled step is slower than the eager channels-last one,
    # and CUDA is not measured yet: "auto" compiles nothing, even a run over the whole split.
    dirichlet = load_experiment("cifar10-resnet20-dirichlet")
    assert dirichlet.compile == "auto" and dirichlet.images_per_process() == float("inf")
    assert not dirichlet.execution("cpu").compile and not dirichlet.execution("cuda").compile
    assert RunConfig(compile="on").execution().compile and not RunConfig(compile="off").execution().compile
    # A device where compiling is faster: compiled once the images a process trains repay the warm-up.
    cost = CompileCost(warm_up_seconds=60.0, eager_images_per_second=300.0, compiled_images_per_second=500.0)
    monkeypatch.setitem(execution_module.MEASURED_COMPILE, "cuda", cost)
    break_even = 60.0 / (1 / 300.0 - 1 / 500.0)  # 45,000 images
    assert not compile_pays(break_even * 0.99, "cuda") and compile_pays(break_even * 1.01, "cuda")
    quickstart = load_experiment("quickstart")  # 3 rounds x 8,000 images over min(4 clients, cores) processes
    assert quickstart.images_per_process() == 3 * 8000 / min(4, os.cpu_count() or 1)
    assert not quickstart.execution("cuda").compile  # at most 24,000 images a process
    assert dirichlet.execution("cuda").compile
    with pytest.raises(ValueError, match="compile = 'yes' is not accepted"):
        RunConfig(compile="yes")


def test_segmentation_refuses_what_its_loop_does_not_run():
    with pytest.raises(ValueError, match="not accepted for segmentation"):
        RunConfig(dataset="fashion-mnist-seg", model="deeplabv3-small", precision="bf16")
    # channels-last crashes torch's CPU backward of the small DeepLabV3: segmentation stays contiguous
    segmentation = RunConfig(dataset="fashion-mnist-seg", model="deeplabv3-small")
    assert segmentation.channels_last and not segmentation.execution().channels_last
    assert RunConfig().execution().channels_last


def test_the_train_benchmark_runs_a_cell_and_writes_its_table(tmp_path):
    out = tmp_path / "train.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "simulations.benchmarks.bench_train",
            "--model=fmnist-cnn",
            "--slice=8x8x3x3",
            "--code-dim=8",
            "--arms=csg",
            "--variants=eager,channels-last",
            "--precisions=fp32",
            "--batch-size=8",
            "--warmup=1",
            "--steps=1",
            "--threads=1",
            f"--out={out}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr

    document = json.loads(out.read_text())
    assert [(c["arm"], c["variant"]) for c in document["cells"]] == [("csg", "eager"), ("csg", "channels-last")]
    assert all(c["images_per_s"] > 0 and c["gflops"] > 0 for c in document["cells"])
    assert "img/s" in done.stdout


def test_a_client_process_keeps_one_compiled_twin_per_run():
    # A Ray actor serves many virtual clients and rounds: the model and its compiled twin are built
    # once per run config, so the graph compiles once per process and run.
    from fedcsg.fl.client_app import _model_and_layout

    cfg = RunConfig(model="fmnist-cnn", dataset="fashion-mnist", slice="8x8x3x3", code_dim=8, compile="on")
    model, _, compiled = _model_and_layout(cfg)
    again, _, compiled_again = _model_and_layout(cfg.replace(arm="csg"))
    assert again is model and compiled_again is compiled and compiled is not None
    assert _model_and_layout(cfg.replace(compile="off"))[2] is None
