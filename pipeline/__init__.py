"""Data pipelines behind one contract: FFCV (.beton), DALI (GPU JPEG decode) and torchvision (PIL).

    from pipeline import LoaderOptions, Placement, build_loader
    loader = build_loader(data_dir, "train", batch_size=256, resolution=160, seed=0, drop_last=True,
                          placement=Placement("cuda", torch.float16, rank=0, world_size=1),
                          options=LoaderOptions(backend="auto", workers=8))
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
from pipeline.contract import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Crops,
    DALIOptions,
    FFCVOptions,
    Loader,
    LoaderOptions,
    Placement,
    Request,
    denormalize,
    normalize_nhwc,
)
from pipeline.order import EpochPlan, plan_epoch

__all__ = [
    "BACKENDS",
    "Crops",
    "DALIOptions",
    "EpochPlan",
    "FFCVOptions",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Loader",
    "LoaderOptions",
    "Placement",
    "Recipe",
    "Request",
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
