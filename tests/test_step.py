"""The train step's fast paths against the plain one: the graph-ready step (training.graphs, run eagerly here: CUDA
graphs need a GPU), our SGD update with tensor LR and momentum against torch.optim.SGD, the compiled step (inductor on
the CPU), one compilation per resolution, and no host synchronisation inside a step."""

from __future__ import annotations

import copy

import pytest
import torch
from _sync_helpers import HostDeviceTraffic

from training.ema import ModelEMA
from training.engine import TrainParts, make_scaler, resolve_precision, resolve_step, train_step
from training.graphs import GraphedStep, sgd_update
from training.model import build_model, build_optimizer
from training.schedules import Schedule

CPU = torch.device("cpu")


def parts_for(model, schedule, ema=True, nesterov=False, graphed=False) -> TrainParts:
    precision = resolve_precision("fp32", CPU)
    optimizer, _ = build_optimizer(model, 5e-4, 0.9, nesterov)
    parts = TrainParts(
        model=model,
        raw_model=model,
        optimizer=optimizer,
        scaler=make_scaler(precision, CPU),
        schedule=schedule,
        precision=precision,
        label_smoothing=0.1,
        ema=ModelEMA(model, 0.9) if ema else None,
    )
    if graphed:
        parts.graphed = GraphedStep(model, model, optimizer, precision, 0.1, parts.ema, capture=False)
    return parts


def batches(res: int, n: int, seed: int, soft: bool = False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(8, 3, res, res, generator=g).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 4, (8,), generator=g)
        out.append((x, torch.softmax(torch.randn(8, 4, generator=g), 1) if soft else y))
    return out


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_update_with_tensor_lr_and_momentum_equals_torch_sgd(nesterov):
    torch.manual_seed(0)
    params = [torch.randn(5, 3), torch.randn(7), torch.randn(2, 2)]
    ours = [p.clone() for p in params]
    ref = [p.clone().requires_grad_() for p in params]
    opt = torch.optim.SGD(
        [{"params": ref[:2], "weight_decay": 1e-2}, {"params": ref[2:], "weight_decay": 0.0}],
        lr=0.0,
        momentum=0.9,
        nesterov=nesterov,
        foreach=True,
    )
    bufs = [torch.zeros_like(p) for p in ours]
    for step in range(5):
        grads = [torch.randn_like(p) for p in params]
        lr, momentum = 0.1 * (step + 1), 0.95 - 0.02 * step  # both change every step, as OneCycle's do
        for group in opt.param_groups:
            group["lr"], group["momentum"] = lr, momentum
        for p, g in zip(ref, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        sgd_update(
            [(ours[:2], grads[:2], bufs[:2], 1e-2), (ours[2:], grads[2:], bufs[2:], 0.0)],
            torch.tensor(lr),
            torch.tensor(momentum),
            nesterov,
        )
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=1e-7)
    for buf, p in zip(bufs, ref, strict=True):
        torch.testing.assert_close(buf, opt.state[p]["momentum_buffer"], rtol=1e-6, atol=1e-7)


def with_tensor_sgd(parts: TrainParts) -> TrainParts:
    """The plain step's optimizer doing its update with sgd_update (the test above ties that to torch.optim.SGD), so
    that the graph-ready step can be compared with it bit for bit."""
    opt = parts.optimizer
    for group in opt.param_groups:
        for p in group["params"]:
            opt.state[p]["momentum_buffer"] = torch.zeros_like(p)

    def step():
        groups = [
            (
                g["params"],
                [p.grad for p in g["params"]],
                [opt.state[p]["momentum_buffer"] for p in g["params"]],
                g["weight_decay"],
            )
            for g in opt.param_groups
        ]
        group = opt.param_groups[0]
        sgd_update(
            groups,
            torch.tensor(group["lr"], dtype=torch.float32),
            torch.tensor(group["momentum"], dtype=torch.float32),
            group["nesterov"],
        )

    opt.step = step
    return parts


def test_the_graph_ready_step_equals_the_plain_step():
    """GraphedStep as it runs inside a CUDA graph (warm-up steps undone, tensor LR and momentum written before each
    replay, the EMA), here replayed eagerly, gives what the plain step gives with the same update arithmetic: bit for
    bit, across a resolution change (a new capture), with OneCycle's LR and momentum changing every step."""
    torch.manual_seed(1)
    model = build_model("resnet18", 4, channels_last=True)
    plain_model = copy.deepcopy(model)
    schedule = Schedule(kind="onecycle", max_lr=0.05, steps_per_epoch=4, epochs=2, cycle_momentum=True)
    plain = with_tensor_sgd(parts_for(plain_model, schedule))
    graphed = parts_for(model, schedule, graphed=True)
    reference = torch.optim.lr_scheduler.OneCycleLR(
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), max_lr=0.05, total_steps=8
    )
    data = batches(32, 4, seed=2) + batches(40, 4, seed=3, soft=True)
    for step, batch in enumerate(data):
        a = train_step(plain, [batch], step, CPU)
        b = train_step(graphed, [batch], step, CPU)
        assert torch.equal(b[0], a[0]) and torch.equal(b[1], a[1]) and b[2:] == a[2:], step
        # the tensor LR of the step is torch's OneCycleLR, the momentum the one the plain optimizer used
        assert float(graphed.graphed.lr) == pytest.approx(reference.get_last_lr()[0], rel=1e-6)
        assert float(graphed.graphed.momentum) == pytest.approx(plain.optimizer.param_groups[0]["momentum"], rel=1e-6)
        reference.optimizer.step()
        reference.step()
    assert graphed.graphed.captures == 0  # capture=False: no graphs, but a set-up per shape
    for (name, x), y in zip(model.state_dict().items(), plain_model.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    for p, q in zip(model.parameters(), plain_model.parameters(), strict=True):
        assert torch.equal(graphed.optimizer.state[p]["momentum_buffer"], plain.optimizer.state[q]["momentum_buffer"])
    for x, y in zip(graphed.ema.module.state_dict().values(), plain.ema.module.state_dict().values(), strict=True):
        assert torch.equal(x, y)
    assert graphed.ema.updates == plain.ema.updates == 8


def test_warm_up_before_a_capture_leaves_no_trace():
    """The warm-up steps before a capture train for real; the state is put back bit for bit."""
    torch.manual_seed(2)
    model = build_model("resnet18", 4, channels_last=True)
    parts = parts_for(model, Schedule(kind="step", max_lr=0.1, steps_per_epoch=1, epochs=1), graphed=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ema_before = {k: v.clone() for k, v in parts.ema.module.state_dict().items()}
    x, y = batches(32, 1, seed=4)[0]
    parts.graphed.lr.fill_(0.1)
    parts.graphed._capture(x, y)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, ema_before[k]) for k, v in parts.ema.module.state_dict().items())
    assert parts.ema.updates == 0
    assert all(not s["momentum_buffer"].any() for s in parts.optimizer.state.values())


def test_step_modes_resolve_with_a_reason():
    gpu = torch.device("cuda", 0)
    assert resolve_step("auto", CPU)[0] == "eager"
    assert resolve_step("auto", gpu) == ("compile", "auto: torch.compile on a GPU")
    assert resolve_step("auto", gpu, deterministic=True)[0] == "eager"
    assert resolve_step("graphs", gpu, precision="bf16") == ("graphs", "asked for")
    for kw, why in (
        (dict(world_size=8), "8 processes"),
        (dict(grad_accum=2), "--grad-accum 2"),
        (dict(precision="fp16"), "fp16"),
    ):
        mode, text = resolve_step("graphs", gpu, **kw)
        assert mode == "compile" and why in text
    assert resolve_step("graphs", CPU)[0] == "compile"
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        model = build_model("resnet18", 4)
        parts_for(model, Schedule(kind="step", max_lr=0.1, steps_per_epoch=1, epochs=1))
        GraphedStep(model, model, build_optimizer(model, 0.0, 0.9, False)[0], resolve_precision("fp32", CPU), 0.0)


@pytest.mark.parametrize("graphed", [False, True])
def test_a_step_reads_nothing_from_the_device_and_copies_nothing_to_it(graphed):
    """What a CUDA graph capture requires and what keeps the host ahead of the GPU: the step (forward, loss,
    backward, SGD, EMA; soft targets as with mixup) on the meta device reads no device value and copies nothing from
    the host. The first call sets the step up (buffers, constants); the following ones are checked."""
    meta = torch.device("meta")
    model = build_model("resnet18", 4, channels_last=True).to(meta)
    precision = resolve_precision("fp32", CPU)
    optimizer, _ = build_optimizer(model, 5e-5, 0.9, False)
    parts = TrainParts(
        model=model,
        raw_model=model,
        optimizer=optimizer,
        scaler=make_scaler(precision, CPU),
        schedule=Schedule(kind="onecycle", max_lr=0.1, steps_per_epoch=4, epochs=1, cycle_momentum=True),
        precision=precision,
        label_smoothing=0.1,
        ema=ModelEMA(model, 0.9),
    )
    if graphed:
        parts.graphed = GraphedStep(model, model, optimizer, precision, 0.1, parts.ema, capture=False)
    x = torch.empty(8, 3, 32, 32, device=meta).contiguous(memory_format=torch.channels_last)
    y = torch.empty(8, 4, device=meta)
    train_step(parts, [(x, y)], 0, meta)
    for step in range(1, 3):
        with HostDeviceTraffic() as traffic:
            loss_sum, correct, n, lr = train_step(parts, [(x, y)], step, meta)
        assert traffic.reads == [] and traffic.copies == [], (traffic.reads, traffic.copies)
        assert loss_sum.device == meta and n == 8 and lr > 0


@pytest.mark.slow  # inductor compiles ResNet-18's forward and backward on the CPU (~1-2 min on 2 cores)
def test_the_compiled_step_matches_the_eager_step():
    """torch.compile (inductor, the trainer's settings: static shapes) against eager, three steps: each loss agrees to
    1e-4 relative, and every weight tensor ends within 5% of the distance the eager steps moved it (fused kernels
    round differently and steps amplify it; a wrong gradient, or a missing update, is off by the whole distance)."""
    from training.components import compile_model

    torch.manual_seed(3)
    model = build_model("resnet18", 4, channels_last=True)
    eager_model = copy.deepcopy(model)
    start = [p.detach().clone() for p in model.parameters()]
    schedule = Schedule(kind="step", max_lr=0.01, steps_per_epoch=3, epochs=1)
    compiled = parts_for(model, schedule, ema=False)
    compiled.model = compile_model(model)
    eager = parts_for(eager_model, schedule, ema=False)
    for step, batch in enumerate(batches(32, 3, seed=5)):
        a = train_step(eager, [batch], step, CPU)
        b = train_step(compiled, [batch], step, CPU)
        torch.testing.assert_close(b[0], a[0], rtol=1e-4, atol=1e-4)
    # per tensor: how far the compiled run's weights are from the eager run's, as a share of how far training moved
    # them from the start
    shares = [
        float((x - y).detach().norm() / (y.detach() - x0).norm())
        for x, y, x0 in zip(model.parameters(), eager_model.parameters(), start, strict=True)
    ]
    assert max(shares) < 0.05, max(shares)


@pytest.mark.slow  # three short epochs of a ResNet-18 on the CPU (~40 s on 2 cores)
def test_progressive_resizing_compiles_once_per_resolution(coded_root, tmp_path, monkeypatch):
    """--step compile with a 32 -> 48 px ramp over three epochs and a short last validation batch: one graph per
    training resolution and one for validation (its last batch is padded to the full size), no more."""
    from torch._dynamo.testing import CompileCounter

    from training.train import main

    counter = CompileCounter()
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **kw: real(module, backend=counter, **kw))
    torch._dynamo.reset()
    argv = [
        "--data-dir",
        str(coded_root),
        "--output-dir",
        str(tmp_path),
        "--run-name",
        "c",
        "--loader",
        "torchvision",
        "--workers",
        "0",
        "--arch",
        "resnet18",
        "--batch-size",
        "8",
        "--val-batch-size",
        "6",
        "--epochs",
        "3",
        "--min-res",
        "32",
        "--max-res",
        "48",
        "--start-ramp",
        "0",
        "--end-ramp",
        "2",
        "--res-step",
        "16",
        "--val-res",
        "40",
        "--step",
        "compile",
        "--device",
        "cpu",
        "--no-progress",
        "--precision",
        "fp32",
    ]
    assert main(argv) == 0
    assert counter.frame_count == 3  # train at 32 px, train at 48 px, eval at 40 px
    torch._dynamo.reset()
