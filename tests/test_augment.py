"""GPU-side augmentations against torchvision.transforms.v2 (run here on the CPU: the functions are device-agnostic)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _sync_helpers import HostDeviceTraffic
from torchvision.transforms import v2

from pipeline.augment import (
    AUTO_AUGMENT_IMAGENET,
    AUTO_AUGMENT_OPS,
    TRIVIAL_AUGMENT_OPS,
    Recipe,
    apply_op,
    auto_augment,
    auto_augment_params,
    auto_augment_space,
    batch_seed,
    cutmix,
    erasing_boxes,
    mixup,
    one_hot,
    random_erasing,
    trivial_augment,
)
from pipeline.contract import denormalize as to_pixels
from pipeline.contract import normalize_nhwc

C = 10


def batch(b: int = 8, size: int = 32, seed: int = 0, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (b, size, size, 3), generator=g, dtype=torch.uint8)
    return normalize_nhwc(pixels, dtype), torch.randint(0, C, (b,), generator=g)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.85])
def test_mixup_equals_torchvision_for_the_same_lambda(lam, monkeypatch):
    images, labels = batch()
    ref = v2.MixUp(alpha=0.2, num_classes=C)
    monkeypatch.setattr(ref._dist, "sample", lambda shape=(): torch.tensor(lam))
    ref_images, ref_targets = ref(images.clone(), labels)
    out_images, out_targets = mixup(images, labels, num_classes=C, lam=lam)
    torch.testing.assert_close(out_images, ref_images)
    torch.testing.assert_close(out_targets, ref_targets)
    assert out_images.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_cutmix_equals_torchvision_for_the_same_draws(seed):
    images, labels = batch(size=40)
    ref = v2.CutMix(alpha=1.0, num_classes=C)
    torch.manual_seed(seed)  # replay the draws CutMix makes: lam, then r_x, then r_y
    lam = float(ref._dist.sample(()))
    cx, cy = int(torch.randint(40, size=(1,))), int(torch.randint(40, size=(1,)))
    torch.manual_seed(seed)
    ref_images, ref_targets = ref(images.clone(), labels)
    out_images, out_targets = cutmix(images, labels, num_classes=C, lam=lam, center=(cy, cx))
    torch.testing.assert_close(out_images, ref_images)
    torch.testing.assert_close(out_targets, ref_targets)
    assert out_images.is_contiguous(memory_format=torch.channels_last)


def test_soft_targets_sum_to_one_and_p_zero_changes_nothing():
    images, labels = batch(16)
    for seed in range(20):
        for fn in (mixup, cutmix):
            _, targets = fn(images, labels, num_classes=C, generator=gen(seed))
            torch.testing.assert_close(targets.sum(1), torch.ones(16))
        _, targets = Recipe(C, seed=seed, mixup=0.2, cutmix=1.0)(images, labels, epoch=0, batch=0)
        torch.testing.assert_close(targets.sum(1), torch.ones(16))
    smooth = one_hot(labels, C, smoothing=0.1)
    torch.testing.assert_close(smooth.sum(1), torch.ones(16))
    assert torch.allclose(smooth.max(1).values, torch.full((16,), 0.91))
    for fn in (mixup, cutmix):
        out, targets = fn(images, labels, num_classes=C, p=0.0, generator=gen())
        assert out is images and torch.equal(targets, one_hot(labels, C))


def test_same_generator_seed_same_result_and_lambda_follows_beta():
    images, labels = batch()
    recipe = Recipe(C, seed=5, mixup=0.2, cutmix=1.0)
    a, b = (recipe(images, labels, epoch=1, batch=2) for _ in range(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # the weight on the sample's own label is lam ~ Beta(0.2, 0.2): mostly near 0 or 1, mean 0.5
    lams = np.array(
        [float(mixup(images, labels, alpha=0.2, num_classes=C, generator=gen(s))[1][0, labels[0]]) for s in range(400)]
    )
    own_is_prev = labels[0] == labels[-1]
    if not own_is_prev:
        assert abs(lams.mean() - 0.5) < 0.08 and np.mean((lams < 0.1) | (lams > 0.9)) > 0.5


def test_random_erasing_boxes_follow_torchvision_area_and_ratio():
    n, h, w = 4000, 64, 48
    boxes = erasing_boxes(n, h, w, p=1.0, scale=(0.02, 1 / 3), ratio=(0.3, 3.3), generator=gen())
    top, left, bh, bw = boxes.T
    erased = bh > 0
    assert erased.float().mean() > 0.9
    assert (top + bh <= h).all() and (left + bw <= w).all() and (bh < h).all() and (bw < w).all()
    frac = (bh * bw).float()[erased] / (h * w)
    assert frac.min() >= 0.015 and frac.max() <= 0.36
    torch.manual_seed(0)
    ref = v2.RandomErasing(p=1.0)
    probe = torch.zeros(3, h, w)
    params = [ref.make_params([probe]) for _ in range(n)]
    ref_frac = np.array([p["h"] * p["w"] / (h * w) for p in params if p["v"] is not None])
    for q in (0.25, 0.5, 0.75):
        assert abs(np.quantile(frac.numpy(), q) - np.quantile(ref_frac, q)) < 0.02


def test_random_erasing_changes_exactly_the_box():
    images, _ = batch(32)
    out = random_erasing(images, p=1.0, value=0.0, generator=gen(3))
    boxes = erasing_boxes(32, 32, 32, p=1.0, scale=(0.02, 1 / 3), ratio=(0.3, 3.3), generator=gen(3))
    for img, new, (t, l_, bh, bw) in zip(images, out, boxes.tolist(), strict=True):
        inside = torch.zeros(32, 32, dtype=torch.bool)
        inside[t : t + bh, l_ : l_ + bw] = True
        assert torch.equal(new[:, ~inside], img[:, ~inside])
        assert (new[:, inside] == 0).all()
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(random_erasing(images, p=0.0, generator=gen()), images)
    noisy = random_erasing(images, p=1.0, value="random", generator=gen(3))
    assert not torch.equal(noisy, out)


MAGNITUDES = {
    "ShearX": [0.3, -0.6],
    "ShearY": [0.5],
    "TranslateX": [7.9, -12.0],
    "TranslateY": [5.0],
    "Rotate": [30.0, -100.0],
    "Brightness": [0.4, -0.5],
    "Color": [0.6, -0.9],
    "Contrast": [0.5, -0.4],
    "Sharpness": [0.9, -0.7],
    "Posterize": [2.0, 5.0, 8.0],
    "Solarize": [0.5, 0.1],
    "AutoContrast": [0.0],
    "Equalize": [0.0],
    "Identity": [0.0],
}


@pytest.mark.parametrize("name", TRIVIAL_AUGMENT_OPS)
def test_each_trivial_augment_operation_matches_torchvision(name):
    g = torch.Generator().manual_seed(7)
    # a smooth image with texture, so geometry and histograms are not degenerate
    yy, xx = torch.meshgrid(torch.arange(40.0), torch.arange(36.0), indexing="ij")
    base = torch.stack([xx * 6, yy * 5, (xx + yy) * 3]) + torch.randint(0, 40, (3, 40, 36), generator=g)
    image = base.clamp(0, 255).to(torch.uint8)
    ta = v2.TrivialAugmentWide()
    # blends are compared on float images (torchvision rounds their uint8 intermediates); the bit-level operations
    # (posterize, solarize, equalize, autocontrast) and the geometry on uint8, where they are defined
    as_float = name in ("Brightness", "Color", "Contrast", "Sharpness")
    for m in MAGNITUDES[name]:
        ref_in = image.float() / 255 if as_float else image
        ref = ta._apply_image_or_video_transform(ref_in, name, m, interpolation=ta.interpolation, fill=ta._fill)
        ref = ref.float() * (255 if as_float else 1)
        out = apply_op(image.float()[None], name, torch.tensor([m]))[0]
        diff = (out - ref).abs()
        if name in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"):
            assert (diff > 0).float().mean() < 0.01, f"{name} {m}"  # nearest neighbour: rare ties at pixel edges
        elif as_float:
            assert diff.max() <= 1e-3 * 255, f"{name} {m}: {diff.max()}"
        elif name == "AutoContrast":  # torchvision truncates its float result (254.9999 -> 254) to uint8
            assert (out - ref).min() >= 0 and (out - ref).max() <= 1, f"{name}: {diff.max()}"
        else:
            assert torch.equal(out, ref), f"{name} {m}: {diff.max()}"


def test_trivial_augment_batch_keeps_layout_is_seeded_and_p_zero_is_identity():
    images, _ = batch(64, dtype=torch.bfloat16)
    a = trivial_augment(images, generator=gen(1))
    assert a.shape == images.shape and a.dtype == torch.bfloat16
    assert a.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(a, trivial_augment(images, generator=gen(1)))
    assert not torch.equal(a, trivial_augment(images, generator=gen(2)))
    x32, _ = batch(8)
    torch.testing.assert_close(trivial_augment(x32, p=0.0, generator=gen()), x32, atol=1e-5, rtol=0)
    pixels = to_pixels(trivial_augment(x32, generator=gen(4)))
    assert pixels.min() >= -0.01 and pixels.max() <= 255.01


def test_auto_augment_policy_and_magnitudes_are_torchvisions():
    from torchvision.transforms import AutoAugment, AutoAugmentPolicy

    tv = AutoAugment(AutoAugmentPolicy.IMAGENET)
    assert [tuple(tuple(step) for step in sub) for sub in tv.policies] == list(AUTO_AUGMENT_IMAGENET)
    ours, ref = auto_augment_space(40, 36), tv._augmentation_space(10, (40, 36))
    assert set(ours) == set(ref)
    for name, (values, signed) in ref.items():
        assert ours[name][1] == signed, name
        if values.ndim:  # ops without magnitude have a 0-d placeholder there
            torch.testing.assert_close(ours[name][0], values.float(), rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("name", sorted({step[0] for sub in AUTO_AUGMENT_IMAGENET for step in sub}))
def test_each_auto_augment_step_matches_torchvision(name):
    """Every (operation, magnitude bin) the ImageNet policy uses, both signs, against torchvision's AutoAugment op."""
    from torchvision.transforms import AutoAugment, InterpolationMode
    from torchvision.transforms.autoaugment import _apply_op

    g = torch.Generator().manual_seed(3)
    yy, xx = torch.meshgrid(torch.arange(40.0), torch.arange(36.0), indexing="ij")
    base = torch.stack([xx * 6, yy * 5, (xx + yy) * 3]) + torch.randint(0, 40, (3, 40, 36), generator=g)
    image = base.clamp(0, 255).to(torch.uint8)
    values, signed = AutoAugment()._augmentation_space(10, (40, 36))[name]
    bins = sorted({step[2] for sub in AUTO_AUGMENT_IMAGENET for step in sub if step[0] == name} - {None})
    magnitudes = [float(values[b]) * sign for b in bins for sign in ((1, -1) if signed else (1,))] or [0.0]
    as_float = name in ("Brightness", "Color", "Contrast", "Sharpness")  # see the TrivialAugment test
    for m in magnitudes:
        ref_in = image.float() / 255 if as_float else image
        ref = _apply_op(ref_in, name, m, interpolation=InterpolationMode.NEAREST, fill=None).float()
        ref = ref * (255 if as_float else 1)
        out = apply_op(image.float()[None], name, torch.tensor([m]), AUTO_AUGMENT_OPS)[0]
        diff = (out - ref).abs()
        if name in ("ShearX", "Rotate"):
            assert (diff > 0).float().mean() < 0.01, f"{name} {m}"
        elif as_float:
            assert diff.max() <= 1e-3 * 255, f"{name} {m}: {diff.max()}"
        elif name == "AutoContrast":
            assert (out - ref).min() >= 0 and (out - ref).max() <= 1, f"{name}: {diff.max()}"
        else:
            assert torch.equal(out, ref), f"{name} {m}: {diff.max()}"


def test_auto_augment_draws_follow_the_policy():
    n = 25_000
    steps = auto_augment_params(n, 32, 32, generator=gen(11))
    space = auto_augment_space(32, 32)
    for k, (names, mags) in enumerate(steps):
        # each op fires as often as the policy says: sum over sub-policies of P(sub) * P(step fires)
        for name in {step[0] for sub in AUTO_AUGMENT_IMAGENET for step in sub}:
            expected = sum(sub[k][1] for sub in AUTO_AUGMENT_IMAGENET if sub[k][0] == name) / len(AUTO_AUGMENT_IMAGENET)
            share = sum(nm == name for nm in names) / n
            assert abs(share - expected) < 0.015, (k, name, share, expected)
        rotations = mags[torch.tensor([nm == "Rotate" for nm in names])]
        if len(rotations):  # bins 3, 8, 9 of 0..30 degrees, either sign, about equally often
            allowed = {round(float(space["Rotate"][0][b]), 4) for b in (3, 8, 9)}
            assert {round(abs(float(v)), 4) for v in rotations} <= allowed
            assert abs(float((rotations > 0).float().mean()) - 0.5) < 0.05
    assert all(nm == "Identity" for names, _ in auto_augment_params(64, 32, 32, p=0.0, generator=gen()) for nm in names)


def test_auto_augment_batch_equals_the_steps_applied_one_sample_at_a_time():
    images, _ = batch(48, size=24, seed=2)
    out = auto_augment(images, generator=gen(5))
    steps = auto_augment_params(48, 24, 24, generator=gen(5))
    x = to_pixels(images)
    for i in range(48):
        xi = x[i : i + 1]
        for names, mags in steps:
            if names[i] != "Identity":
                xi = apply_op(xi, names[i], mags[i : i + 1], AUTO_AUGMENT_OPS)
        torch.testing.assert_close(to_pixels(out[i : i + 1]), xi, atol=1e-3, rtol=0)
    assert any(names[i] != "Identity" for names, _ in steps for i in range(48))
    half, _ = batch(32, dtype=torch.bfloat16)
    a = auto_augment(half, generator=gen(1))
    assert a.dtype == torch.bfloat16 and a.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(a, auto_augment(half, generator=gen(1)))
    assert not torch.equal(a, auto_augment(half, generator=gen(2)))
    torch.testing.assert_close(auto_augment(images, p=0.0, generator=gen()), images, atol=1e-5, rtol=0)


def test_recipe_runs_the_policy_seeded_per_batch_then_erasing_then_mixing():
    """The recipe draws as the standalone functions do with one generator seeded by (seed, epoch, batch, rank):
    policy first, then erasing, then the mix choice."""
    images, labels = batch(16, size=24, seed=1)
    out, same = Recipe(C, seed=3, policy="autoaugment")(images, labels, epoch=1, batch=4)
    assert same is labels
    assert torch.equal(out, auto_augment(images, generator=gen(batch_seed(3, 1, 4, 0))))
    assert not torch.equal(out, Recipe(C, seed=3, policy="autoaugment")(images, labels, epoch=1, batch=4, rank=1)[0])
    out, _ = Recipe(C, seed=3, policy="trivialaugment", random_erase=0.5)(images, labels, epoch=0, batch=0)
    g = gen(batch_seed(3, 0, 0, 0))
    assert torch.equal(out, random_erasing(trivial_augment(images, generator=g), p=0.5, generator=g))
    out, targets = Recipe(C, seed=3, cutmix=1.0)(images, labels, epoch=0, batch=7)
    ref_images, ref_targets = cutmix(images, labels, alpha=1.0, num_classes=C, generator=gen(batch_seed(3, 0, 7, 0)))
    assert torch.equal(out, ref_images) and torch.equal(targets, ref_targets)


def test_recipe_mix_odds():
    images, labels = batch(8, size=16)
    recipe = Recipe(C, mixup=0.2, cutmix=1.0, mix_prob=0.8, mix_switch_prob=0.25)
    kinds = [recipe.draw(8, 16, 16, gen(batch_seed(0, 0, b, 0))).mix for b in range(2000)]
    none = sum(k is None for k in kinds) / len(kinds)
    cut = sum(k is not None and k[0] == "cutmix" for k in kinds) / len(kinds)
    assert abs(none - 0.2) < 0.03 and abs(cut - 0.8 * 0.25) < 0.03
    _, targets = Recipe(C, mixup=0.2, mix_prob=0.0)(images, labels, epoch=0, batch=0)
    assert torch.equal(targets, one_hot(labels, C))  # mixing on but not drawn: still soft targets
    assert not Recipe(C).active and Recipe(C, random_erase=0.1).active


@pytest.mark.parametrize("policy", ["autoaugment", "trivialaugment"])
def test_the_recipe_reads_nothing_from_the_device_and_copies_once_per_batch(policy):
    """On a GPU each host-device copy or value read stalls the host (torch.cuda.set_sync_debug_mode flags them;
    scripts/gpu_check.sh runs that check). Here the batch lives on the meta device: a read of a value would raise, and
    the dispatch mode counts host-to-device copies: exactly one per batch, non-blocking."""
    recipe = Recipe(C, seed=1, policy=policy, random_erase=0.5, mixup=0.2, cutmix=1.0, mix_prob=0.9)
    images = torch.empty(32, 3, 24, 24, device="meta").contiguous(memory_format=torch.channels_last)
    labels = torch.empty(32, dtype=torch.int64, device="meta")
    recipe(images, labels, epoch=0, batch=0)  # the normalisation constants reach the device once, then stay
    kinds = set()
    for b in range(1, 12):
        with HostDeviceTraffic() as traffic:
            out, targets = recipe(images, labels, epoch=0, batch=b)
        assert traffic.reads == [] and traffic.copies == [True], (b, traffic.reads, traffic.copies)
        assert out.shape == images.shape and out.is_contiguous(memory_format=torch.channels_last)
        assert targets.shape == (32, C)
        mix = recipe.draw(32, 24, 24, gen(batch_seed(1, 0, b, 0))).mix
        kinds.add(mix[0] if mix else None)
    assert {"mixup", "cutmix"} <= kinds  # both mixing paths were exercised
