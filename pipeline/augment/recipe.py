"""The batch augmentation of a training run: one recipe, used by the trainer and by `rn50 show-batch`.

In torchvision's reference order: a per-sample policy (AutoAugment's ImageNet policy or TrivialAugmentWide), random
erasing, then MixUp or CutMix for the whole batch (soft targets). Its randomness is a pure function of
(seed, epoch, batch index, rank) (`batch_seed`): a run resumed at any step draws what the uninterrupted run drew, with
no generator state to save, and different ranks draw differently (their batches differ too).

No host synchronisation: every random number is drawn on the host from a CPU generator first; the per-sample
numbers the device needs (policy groups and magnitudes, erasing boxes) then travel in one pinned, non-blocking copy
(pipeline.contract.to_device), and mixing takes its few numbers as Python scalars. Nothing reads a device value back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.augment.erasing import apply_erasing, draw_noise_seed, erasing_boxes
from pipeline.augment.mixing import (
    CutBox,
    apply_cutmix,
    apply_mixup,
    draw_cutmix,
    draw_mixup,
    soft_targets,
)
from pipeline.augment.policies import POLICIES, PolicyStep, apply_steps
from pipeline.contract import to_device

POLICY_NAMES = ("none", *POLICIES)


def batch_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    """The seed of one micro-batch's augmentation draws: a pure function of (seed, epoch, batch index, rank)."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, batch, rank, 0xA0C]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


@dataclass(frozen=True)
class Draws:
    """Everything random about one batch, drawn on the host before any work on the device."""

    steps: list[PolicyStep]
    erase_boxes: torch.Tensor | None  # (B, 4) int64 CPU
    noise_seed: int | None
    mix: tuple[str, float | CutBox] | None  # ("mixup", lam) or ("cutmix", box)


@dataclass(frozen=True)
class Recipe:
    """policy: none | autoaugment | trivialaugment. random_erase: per-sample probability. mixup/cutmix: Beta alphas
    (0: off); with both on, a batch gets CutMix with probability mix_switch_prob, else MixUp; either is applied with
    probability mix_prob. erase_value: 0 (the mean colour) or "random" (noise)."""

    num_classes: int
    seed: int = 0
    policy: str = "none"
    random_erase: float = 0.0
    erase_value: float | str = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    mix_prob: float = 1.0
    mix_switch_prob: float = 0.5

    def __post_init__(self) -> None:
        if self.policy not in POLICY_NAMES:
            raise ValueError(f"policy must be one of {', '.join(POLICY_NAMES)}, got {self.policy!r}")

    @property
    def active(self) -> bool:
        return self.policy != "none" or self.random_erase > 0 or self.mixes

    @property
    def mixes(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    def draw(self, n: int, height: int, width: int, generator: torch.Generator) -> Draws:
        steps = POLICIES[self.policy][0](n, height, width, generator) if self.policy != "none" else []
        boxes = noise = None
        if self.random_erase > 0:
            boxes = erasing_boxes(
                n, height, width, p=self.random_erase, scale=(0.02, 1 / 3), ratio=(0.3, 3.3), generator=generator
            )
            noise = draw_noise_seed(self.erase_value, generator)
        mix = None
        if self.mixes:
            use_cutmix = self.cutmix > 0 and (
                self.mixup == 0 or float(torch.rand((), generator=generator)) < self.mix_switch_prob
            )
            if use_cutmix:
                box = draw_cutmix(height, width, self.cutmix, self.mix_prob, generator)
                mix = ("cutmix", box) if box is not None else None
            else:
                lam = draw_mixup(self.mixup, self.mix_prob, generator)
                mix = ("mixup", lam) if lam is not None else None
        return Draws(steps, boxes, noise, mix)

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, *, epoch: int, batch: int, rank: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) -> (augmented images, targets): int64 labels unchanged without mixing, else (B, C)
        float32 soft targets. Images keep shape, dtype, device and memory format."""
        generator = torch.Generator().manual_seed(batch_seed(self.seed, epoch, batch, rank))
        n, (height, width) = images.shape[0], images.shape[-2:]
        d = self.draw(n, height, width, generator)
        host = [t for s in d.steps for t in s.host_tensors()] + ([d.erase_boxes] if d.erase_boxes is not None else [])
        on_device = to_device(host, images.device)  # the batch's one host-to-device copy
        if d.steps:
            images = apply_steps(images, d.steps, POLICIES[self.policy][1], on_device[: 2 * len(d.steps)])
        if d.erase_boxes is not None:
            images = apply_erasing(images, on_device[-1], self.erase_value, d.noise_seed)
        if not self.mixes:
            return images, labels
        targets = soft_targets(labels, self.num_classes)
        if d.mix is None:
            return images, targets
        kind, value = d.mix
        return apply_mixup(images, targets, value) if kind == "mixup" else apply_cutmix(images, targets, value)
