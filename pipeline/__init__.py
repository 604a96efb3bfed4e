"""Data pipelines behind one contract: FFCV (.beton), DALI (GPU JPEG decode) and torchvision (PIL).

    from pipeline import build_loader
    loader = build_loader(data_dir, split="train", backend="auto", batch_size=256, resolution=160, workers=8,
                          device="cuda", dtype=torch.float16, rank=0, world_size=1, seed=0, drop_last=True)
    for images, labels in loader: ...

Importing this package is light: ffcv and DALI are imported only when their backend is built.
"""

from pipeline.augment import (
    TRIVIAL_AUGMENT_OPS,
    Recipe,
    auto_augment,
    cutmix,
    mixup,
    one_hot,
    random_erasing,
    trivial_augment,
)
from pipeline.build import BACKENDS, available_backends, build_loader
from pipeline.contract import IMAGENET_MEAN, IMAGENET_STD, Loader, denormalize, normalize_nhwc
from pipeline.order import EpochPlan, plan_epoch

__all__ = [
    "BACKENDS",
    "EpochPlan",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Loader",
    "Recipe",
    "TRIVIAL_AUGMENT_OPS",
    "auto_augment",
    "available_backends",
    "build_loader",
    "cutmix",
    "denormalize",
    "mixup",
    "normalize_nhwc",
    "one_hot",
    "plan_epoch",
    "random_erasing",
    "trivial_augment",
]
