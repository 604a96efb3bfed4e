"""Batch augmentations that run wherever the batch is (the GPU in training), shared by every backend.

    mixing.py    MixUp, CutMix, one-hot/soft targets
    erasing.py   random erasing
    ops.py       the image operations of the policies, and their name -> function tables
    policies.py  per-sample TrivialAugmentWide and AutoAugment (ImageNet policy), grouped by operation
    recipe.py    the run's recipe: policy, erasing, then mixing, seeded per batch (trainer and rn50 show-batch)

All functions are pure: they take a batch and return new tensors, and every random draw comes from an explicit CPU
`generator` (None uses torch's default one), so choosing which samples get which operation needs no device
synchronisation. Images: (B, 3, H, W) float32/float16/bfloat16, ImageNet-normalised (what the loaders yield), any
memory format, kept. Labels: (B,) int64 class indices, or (B, C) float soft targets; mixing returns (B, C) float32
soft targets whose rows sum to 1. Semantics follow torchvision (v2 MixUp, CutMix, RandomErasing, TrivialAugmentWide;
AutoAugment's IMAGENET policy), which the tests use as the reference; the difference is that the policies draw an
operation and magnitude per sample for a whole batch at once, instead of per image on the CPU.
"""

from pipeline.augment.erasing import erasing_boxes, random_erasing
from pipeline.augment.mixing import cutmix, mixup, one_hot
from pipeline.augment.ops import AUTO_AUGMENT_OPS, TRIVIAL_OPS, apply_op
from pipeline.augment.policies import (
    AUTO_AUGMENT_IMAGENET,
    TRIVIAL_AUGMENT_OPS,
    auto_augment,
    auto_augment_params,
    auto_augment_space,
    trivial_augment,
    trivial_augment_params,
)
from pipeline.augment.recipe import POLICY_NAMES, Recipe, batch_seed

__all__ = [
    "AUTO_AUGMENT_IMAGENET",
    "AUTO_AUGMENT_OPS",
    "POLICY_NAMES",
    "Recipe",
    "TRIVIAL_AUGMENT_OPS",
    "TRIVIAL_OPS",
    "apply_op",
    "auto_augment",
    "auto_augment_params",
    "auto_augment_space",
    "batch_seed",
    "cutmix",
    "erasing_boxes",
    "mixup",
    "one_hot",
    "random_erasing",
    "trivial_augment",
    "trivial_augment_params",
]
