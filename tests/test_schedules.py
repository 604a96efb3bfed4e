"""LR schedules against torch's OneCycleLR and ffcv-imagenet's triangular formula; progressive resolution."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.config import TrainConfig
from training.schedules import Schedule, apply_schedule, build_schedule, resolution_at, train_resolution


def torch_onecycle_trace(
    total_steps: int, max_lr: float, pct_start: float, div_factor: float, final_div_factor: float, cycle_momentum: bool
) -> tuple[list[float], list[float]]:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=max_lr,
        total_steps=total_steps,
        pct_start=pct_start,
        div_factor=div_factor,
        final_div_factor=final_div_factor,
        cycle_momentum=cycle_momentum,
    )
    lrs, moms = [], []
    for _ in range(total_steps):
        lrs.append(opt.param_groups[0]["lr"])
        moms.append(opt.param_groups[0]["momentum"])
        opt.step()
        sched.step()
    return lrs, moms


@pytest.mark.parametrize(
    "epochs,steps,pct,div,final",
    [(3, 7, 0.3, 25.0, 1e4), (10, 13, 0.25, 10.0, 100.0), (1, 5, 0.5, 25.0, 1e4), (120, 40, 0.3, 25.0, 1e4)],
)
def test_onecycle_equals_torch(epochs, steps, pct, div, final):
    sched = Schedule(
        "onecycle",
        max_lr=0.8,
        steps_per_epoch=steps,
        epochs=epochs,
        pct_start=pct,
        div_factor=div,
        final_div_factor=final,
        cycle_momentum=True,
        base_momentum=0.85,
        max_momentum=0.95,
    )
    ref_lr, ref_mom = torch_onecycle_trace(epochs * steps, 0.8, pct, div, final, True)
    ours_lr = [sched.lr_at(s) for s in range(sched.total_steps)]
    ours_mom = [sched.momentum_at(s) for s in range(sched.total_steps)]
    np.testing.assert_allclose(ours_lr, ref_lr, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ours_mom, ref_mom, rtol=1e-9, atol=1e-12)


def test_apply_schedule_sets_every_group():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD(
        [{"params": [a], "weight_decay": 1e-4}, {"params": [b], "weight_decay": 0.0}], lr=0.0, momentum=0.9
    )
    sched = Schedule("onecycle", max_lr=1.0, steps_per_epoch=10, epochs=2, cycle_momentum=True)
    lr = apply_schedule(opt, sched, 5)
    assert lr == sched.lr_at(5)
    assert [g["lr"] for g in opt.param_groups] == [lr, lr]
    assert [g["momentum"] for g in opt.param_groups] == [sched.momentum_at(5)] * 2
    flat = Schedule("triangular", max_lr=1.0, steps_per_epoch=10, epochs=4)
    apply_schedule(opt, flat, 3)
    assert [g["momentum"] for g in opt.param_groups] == [sched.momentum_at(5)] * 2  # left alone


def test_triangular_matches_ffcv_formula():
    # ffcv-imagenet: np.interp(epoch, [0, lr_peak_epoch, epochs], [1e-4 * lr, lr, 0]) at fractional epochs.
    epochs, spe, lr, peak = 16, 9, 1.7, 2
    sched = Schedule("triangular", max_lr=lr, steps_per_epoch=spe, epochs=epochs, lr_peak_epoch=peak)
    for step in range(epochs * spe):
        expected = np.interp(step / spe, [0, peak, epochs], [1e-4 * lr, lr, 0])
        assert sched.lr_at(step) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert sched.lr_at(peak * spe) == pytest.approx(lr)
    assert sched.lr_at(epochs * spe) == 0.0


def test_cosine_and_step_with_warmup():
    cos = Schedule("cosine", max_lr=1.0, steps_per_epoch=10, epochs=10, warmup_epochs=2, div_factor=10)
    assert cos.lr_at(0) == pytest.approx(0.1)
    assert cos.lr_at(10) == pytest.approx(0.55)
    assert cos.lr_at(20) == pytest.approx(1.0)
    assert cos.lr_at(60) == pytest.approx(0.5)  # half-way through the cosine part
    assert cos.lr_at(100) == pytest.approx(0.0, abs=1e-12)
    step = Schedule("step", max_lr=1.0, steps_per_epoch=10, epochs=9, step_epochs=(3, 6), step_gamma=0.1)
    assert [step.lr_at(e * 10 + 5) for e in range(9)] == pytest.approx([1, 1, 1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01])


def test_lr_ref_batch_scales_linearly():
    cfg = TrainConfig(max_lr=1.7, lr_ref_batch=4096, batch_size=256, grad_accum=2, lr_schedule="triangular")
    sched = build_schedule(cfg, steps_per_epoch=10, world_size=4)
    assert sched.max_lr == pytest.approx(1.7 * 256 * 4 * 2 / 4096)
    assert build_schedule(TrainConfig(max_lr=0.3), 10, 8).max_lr == 0.3


def test_progressive_resolution_ffcv_ramp():
    # rn50_88_epochs: 160 px through epoch 65, 192 from 76, multiples of 32 in between.
    res = [resolution_at(e, 160, 192, 65, 76) for e in range(88)]
    assert res[:66] == [160] * 66
    assert res[76:] == [192] * 12
    assert set(res) == {160, 192}
    assert res == sorted(res)
    switch = res.index(192)
    assert 66 <= switch <= 76
    # finer steps show the linear ramp itself
    fine = [resolution_at(e, 160, 192, 0, 4, step=8) for e in range(5)]
    assert fine == [160, 168, 176, 184, 192]


def test_train_resolution_fixed_or_progressive():
    assert train_resolution(TrainConfig(res=128), 5) == 128
    cfg = TrainConfig(min_res=64, max_res=96, start_ramp=1, end_ramp=3, res_step=16)
    assert [train_resolution(cfg, e) for e in range(5)] == [64, 64, 80, 96, 96]
