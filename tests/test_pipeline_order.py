"""Epoch order, sharding and crop boxes: pure functions, checked against their definitions and torchvision."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.transforms import RandomResizedCrop

from pipeline.crops import center_crop_boxes, random_resized_crop_boxes, sample_keys, uniforms
from pipeline.order import batches_per_rank, epoch_order, page_grouped_order, plan_epoch


def test_epoch_order_is_a_permutation_that_depends_on_seed_and_epoch_only():
    a = epoch_order(1000, seed=1, epoch=7, shuffle=True)
    assert sorted(a.tolist()) == list(range(1000))
    assert np.array_equal(a, epoch_order(1000, seed=1, epoch=7, shuffle=True))
    assert not np.array_equal(a, epoch_order(1000, seed=1, epoch=8, shuffle=True))
    assert not np.array_equal(a, epoch_order(1000, seed=2, epoch=7, shuffle=True))
    assert np.array_equal(epoch_order(5, seed=1, epoch=7, shuffle=False), np.arange(5))


@pytest.mark.parametrize("n,world,bs", [(1000, 1, 32), (1000, 2, 32), (1003, 3, 10), (64, 4, 16)])
def test_drop_last_shards_are_disjoint_full_and_equal(n, world, bs):
    plans = [
        plan_epoch(n, seed=0, epoch=3, shuffle=True, rank=r, world_size=world, batch_size=bs, drop_last=True)
        for r in range(world)
    ]
    expected = n // (world * bs)
    assert {p.num_batches for p in plans} == {expected} == {batches_per_rank(n, world, bs, True)}
    assert all(len(p.indices) == expected * bs == p.num_real for p in plans)
    everything = np.concatenate([p.indices for p in plans])
    assert len(np.unique(everything)) == len(everything)


@pytest.mark.parametrize("n,world,bs", [(10, 3, 4), (16, 3, 4), (7, 4, 2), (5, 8, 2), (100, 1, 32)])
def test_padded_shards_cover_every_sample_once_after_masking(n, world, bs):
    plans = [
        plan_epoch(n, seed=0, epoch=0, shuffle=True, rank=r, world_size=world, batch_size=bs, drop_last=False)
        for r in range(world)
    ]
    assert {p.num_batches for p in plans} == {batches_per_rank(n, world, bs, False)}
    real = []
    for p in plans:
        assert len(p.indices) == math.ceil(n / world)
        for b in range(p.num_batches):
            real.extend(p.batch(b)[: p.num_valid(b)].tolist())
        assert sum(p.num_valid(b) for b in range(p.num_batches)) == p.num_real
    assert sorted(real) == list(range(n))


def test_too_small_for_one_batch_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot fill one batch"):
        plan_epoch(10, seed=0, epoch=0, shuffle=True, rank=0, world_size=2, batch_size=8, drop_last=True)


def test_keys_and_uniforms_are_deterministic_and_spread():
    k = sample_keys(0, 0, np.arange(20000))
    assert np.array_equal(k, sample_keys(0, 0, np.arange(20000)))
    assert len(np.unique(k)) == 20000
    assert not np.array_equal(k[:100], sample_keys(0, 1, np.arange(100)))
    assert not np.array_equal(k[:100], sample_keys(1, 0, np.arange(100)))
    u = uniforms(k, 3)
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.005
    assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.03


def test_random_resized_crop_boxes_follow_torchvision_distribution():
    h, w, n = 300, 200, 20000
    boxes, flips = random_resized_crop_boxes(np.full(n, h), np.full(n, w), sample_keys(0, 0, np.arange(n)))
    top, left, bh, bw = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + bh <= h).all() and (left + bw <= w).all()
    assert (bh > 0).all() and (bw > 0).all()
    area = bh * bw / (h * w)
    aspect = bw / bh
    assert area.min() >= 0.07 and area.max() <= 1.0
    assert aspect.min() >= 0.74 and aspect.max() <= 1.35
    assert abs(flips.mean() - 0.5) < 0.02
    torch.manual_seed(0)
    ref = np.array([RandomResizedCrop.get_params(torch.empty(3, h, w), [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)])
    ref_area = ref[:, 2] * ref[:, 3] / (h * w)
    for q in (0.1, 0.5, 0.9):
        assert abs(np.quantile(area, q) - np.quantile(ref_area, q)) < 0.03
    assert abs((top + bh / 2).mean() - (ref[:, 0] + ref[:, 2] / 2).mean()) < 2


@pytest.mark.parametrize(
    "h,w,scale,ratio",
    [(10, 1000, (0.9, 1.0), (1.0, 1.0)), (1000, 10, (0.9, 1.0), (0.5, 2.0)), (64, 64, (0.99, 1.0), (3.0, 4.0))],
)
def test_fallback_box_equals_torchvision(h, w, scale, ratio):
    boxes, _ = random_resized_crop_boxes([h], [w], sample_keys(0, 0, [0]), scale, ratio)
    assert tuple(boxes[0]) == RandomResizedCrop.get_params(torch.empty(3, h, w), list(scale), list(ratio))


@pytest.mark.parametrize("h,w", [(80, 96), (96, 80), (375, 500), (17, 17)])
def test_center_crop_box_matches_torchvision_resize_then_center_crop(h, w):
    top, left, ch, cw = center_crop_boxes([h], [w], 224 / 256)[0]
    side = int(224 / 256 * min(h, w))
    assert (ch, cw) == (side, side)
    assert (top, left) == ((h - side) // 2, (w - side) // 2)
    # torchvision Resize(R / 0.875) + CenterCrop(R) keeps the same centred square, up to one pixel of rounding
    assert abs(top + ch / 2 - h / 2) <= 1 and abs(left + cw / 2 - w / 2) <= 1


def test_page_grouped_order_keeps_windows_of_pages_together():
    pages = np.repeat(np.arange(40), 25)  # 40 pages of 25 samples
    order = page_grouped_order(pages, seed=0, epoch=2, window_pages=4)
    assert sorted(order.tolist()) == list(range(1000))
    assert np.array_equal(order, page_grouped_order(pages, seed=0, epoch=2, window_pages=4))
    assert not np.array_equal(order, page_grouped_order(pages, seed=0, epoch=3, window_pages=4))
    for start in range(0, 1000, 100):  # each run of 4 pages' worth of samples touches exactly 4 pages
        assert len(np.unique(pages[order[start : start + 100]])) == 4
    assert len(np.unique(pages[order[:25]])) > 1  # ... and mixes them


def test_block_shards_are_contiguous_runs_of_the_order():
    order = np.arange(100)[::-1].copy()
    plans = [
        plan_epoch(
            100,
            seed=0,
            epoch=0,
            shuffle=True,
            rank=r,
            world_size=3,
            batch_size=8,
            drop_last=False,
            order=order,
            shard="block",
        )
        for r in range(3)
    ]
    assert [p.indices.tolist() for p in plans[:2]] == [order[:34].tolist(), order[34:68].tolist()]
    assert plans[2].num_real == 32 and len(plans[2].indices) == 34
    assert {p.num_batches for p in plans} == {5}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_normalize_nhwc_equals_torchvision_normalize_and_is_channels_last(dtype):
    from torchvision.transforms import v2

    from pipeline.contract import normalize_nhwc

    pixels = torch.randint(0, 256, (4, 20, 24, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = normalize_nhwc(pixels, dtype)
    ref = v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])(pixels.permute(0, 3, 1, 2).float() / 255)
    assert out.shape == (4, 3, 20, 24) and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last)
    tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
