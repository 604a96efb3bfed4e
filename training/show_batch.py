"""`rn50 show-batch`: save one batch as the trainer sees it, as a picture with class names.

    rn50 show-batch --data-dir /data/betons --out batch.png                                  # the default recipe
    rn50 show-batch --config reference_onecycle_120ep --data-dir /data/betons --epoch 3 --out aug.png
    rn50 show-batch --data-dir /data/imagenet --loader torchvision --auto-augment trivialaugment --random-erase 0.25 \\
        --mixup 0.2 --cutmix 1.0 --out aug.png

The loader, resolution (progressive resizing included: --epoch picks the epoch) and augmentation recipe come from the
same config and code as `rn50 train` (every training flag works here, --config too), so the picture shows what a
training step gets: wrong labels, colour channels, crops or augmentation strength show at a glance. Titles are the
class (wnid and name when LOC_synset_mapping.txt is in the data dir); after mixup/cutmix they show the two largest
target weights. --split val shows the validation crop (no augmentation).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import sys
from pathlib import Path

from dataset_tools.files import check_writable
from training.config import ConfigError, Parser, add_config_flags, resolve
from training.preflight import DataError, check_data

PROG = "rn50 show-batch"
# training flags that mean nothing for one picture
_SKIP = (
    "resume",
    "keep_last",
    "stop_after_epoch",
    "checkpoint_every",
    "checkpoint_minutes",
    "log_every",
    "progress",
    "run_name",
    "output_dir",
    "ema",
    "ema_decay",
    "tta",
)


def class_names(data_dir: Path, classes: list[str]) -> list[str]:
    """'wnid name' per class when LOC_synset_mapping.txt ('n01440764 tench, Tinca tinca') is in data_dir."""
    names = {}
    mapping = data_dir / "LOC_synset_mapping.txt"
    try:
        lines = mapping.read_text(errors="replace").splitlines() if mapping.is_file() else []
    except OSError:  # names are a nicety: an unreadable mapping leaves the wnids
        lines = []
    for line in lines:
        wnid, _, text = line.partition(" ")
        names[wnid] = text.split(",")[0].strip()
    return [f"{c} {names[c]}" if c in names else c for c in classes]


def draw(images, targets, names: list[str], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.contract import denormalize

    pixels = denormalize(images).clamp(0, 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    n = len(pixels)
    cols = min(8, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    soft = targets.float().cpu() if targets.ndim == 2 else None
    for i, (ax, img) in enumerate(zip(axes.flat, pixels, strict=False)):
        ax.imshow(img)
        if soft is None:
            parts = [names[int(targets[i])][:22]]
        else:
            weights, classes = soft[i].topk(min(2, soft.shape[1]))
            parts = [f"{names[int(c)][:22]} {float(w):.2f}" for w, c in zip(weights, classes, strict=True) if w > 0.005]
            parts = parts if len(parts) > 1 else [names[int(classes[0])][:22]]
        ax.set_title("\n".join(parts), fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("picture")
    g.add_argument("--split", default="train", choices=("train", "val"))
    g.add_argument(
        "--epoch", type=int, default=0, help="the epoch whose first batch is shown (order, crops, resolution)"
    )
    g.add_argument("--images", type=int, default=32, help="images in the grid: the batch size used here (32)")
    g.add_argument("--out", default="batch.png", help="PNG to write (batch.png)")
    add_config_flags(p, skip=_SKIP)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = resolve(args)
        problems = cfg.validate()
        if args.images < 1 or args.epoch < 0:
            problems.append("--images must be >= 1 and --epoch >= 0")
        if problems:
            raise ConfigError("; ".join(problems))
        check_data(cfg)
        check_writable(args.out)  # before the loader and the batch: they are the slow part
    except (ConfigError, DataError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(
            f"{PROG}: error: --out {args.out}: cannot write there ({e.strerror or e}); choose another path",
            file=sys.stderr,
        )
        return 2
    return show(dataclasses.replace(cfg, num_classes=0), args)


def show(cfg, args: argparse.Namespace) -> int:
    import torch

    from training.components import make_loader, make_recipe
    from training.distributed import DeviceError, DistContext, resolve_device
    from training.schedules import train_resolution

    try:
        ctx = DistContext(rank=0, local_rank=0, world_size=1, device=resolve_device(cfg.device, 0))
    except DeviceError as e:
        print(f"rn50 show-batch: error: {e}", file=sys.stderr)
        return 2
    train = args.split == "train"
    resolution = train_resolution(cfg, args.epoch) if train else cfg.val_res
    try:
        loader = make_loader(cfg, args.split, ctx, torch.float32, resolution=resolution, batch_size=args.images)
        loader.set_epoch(args.epoch)
        images, labels = next(iter(loader))
    except (OSError, ValueError, RuntimeError) as e:
        print(f"{PROG}: error: {(str(e) or type(e).__name__).splitlines()[0]}", file=sys.stderr)
        return 2
    recipe = make_recipe(cfg, loader.num_classes)
    if train and recipe.active:
        images, labels = recipe(images, labels, epoch=args.epoch, batch=0)
    out = Path(args.out)
    data_dir = Path(cfg.data_dir)
    augments = [
        name
        for name, on in (
            ("policy " + recipe.policy, recipe.policy != "none"),
            (f"erasing {recipe.random_erase:g}", recipe.random_erase > 0),
            (f"mixup {recipe.mixup:g}", recipe.mixup > 0),
            (f"cutmix {recipe.cutmix:g}", recipe.cutmix > 0),
        )
        if on
    ]
    title = f"{data_dir.name}/{args.split} via {loader.backend}, {resolution} px, epoch {args.epoch}" + (
        f", {' + '.join(augments)}" if train and augments else ""
    )
    try:
        draw(images, labels, class_names(data_dir, loader.classes), out, title)
    except OSError as e:
        fix = "free space there" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "choose another --out"
        print(f"{PROG}: error: cannot write {e.filename or out} ({e.strerror or e}); {fix}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({len(images)} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
