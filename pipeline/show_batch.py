"""`rn50 show-batch`: save one training batch as a picture, de-normalised, with class names.

    rn50 show-batch --data-dir /data/betons --out batch.png                       # what the trainer will see
    rn50 show-batch --data-dir /data/imagenet --backend torchvision --augment autoaugment,erasing,mix --out aug.png

The quickest way for a person to trust a pipeline: wrong labels, colour channels, crops or augmentation strength show
at a glance. Titles are the class (wnid and name when LOC_synset_mapping.txt is in the data dir); after mixup/cutmix
they show the two largest target weights.
"""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path

AUGMENTS = ("autoaugment", "trivial", "erasing", "mixup", "cutmix", "mix")


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


def augment_batch(images, labels, augments: list[str], num_classes: int, seed: int):
    """Apply the chosen augmentations in the trainer's order: per-sample policy, erasing, then mixing."""
    import torch

    from pipeline.augment import auto_augment, cutmix, mixup, mixup_or_cutmix, one_hot, random_erasing, trivial_augment

    g = torch.Generator().manual_seed(seed)
    if "autoaugment" in augments:
        images = auto_augment(images, generator=g)
    if "trivial" in augments:
        images = trivial_augment(images, generator=g)
    if "erasing" in augments:
        images = random_erasing(images, p=0.5, generator=g)
    targets = one_hot(labels, num_classes)
    if "mix" in augments:
        images, targets = mixup_or_cutmix(images, labels, num_classes=num_classes, generator=g)
    elif "mixup" in augments:
        images, targets = mixup(images, labels, alpha=0.4, num_classes=num_classes, generator=g)
    elif "cutmix" in augments:
        images, targets = cutmix(images, labels, alpha=1.0, num_classes=num_classes, generator=g)
    return images, targets


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
    for ax, img, t in zip(axes.flat, pixels, targets.float().cpu(), strict=False):
        ax.imshow(img)
        weights, classes = t.topk(min(2, len(t)))
        parts = [names[int(c)][:22] for w, c in zip(weights, classes, strict=True) if w > 0.005]
        if len(parts) > 1:
            parts = [f"{p} {float(w):.2f}" for p, w in zip(parts, weights, strict=False)]
        ax.set_title("\n".join(parts), fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rn50 show-batch", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="train.beton/val.beton + classes.json, or train/ val/ folders")
    p.add_argument("--backend", default="auto", choices=("auto", "ffcv", "dali", "torchvision"))
    p.add_argument("--split", default="train", choices=("train", "val"))
    p.add_argument("--augment", default="", help=f"comma-separated, of {', '.join(AUGMENTS)} (mix = mixup or cutmix)")
    p.add_argument("--batch-size", type=int, default=32, help="images in the grid (32)")
    p.add_argument("--resolution", type=int, default=160, help="side in px (160)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epoch", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda if available, else cpu")
    p.add_argument("--out", default="batch.png", help="PNG to write (batch.png)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    augments = [a.strip() for a in args.augment.split(",") if a.strip()]
    unknown = [a for a in augments if a not in AUGMENTS]
    if unknown:
        print(f"rn50 show-batch: error: unknown --augment {', '.join(unknown)}; choose from {', '.join(AUGMENTS)}",
              file=sys.stderr)
        return 2
    if args.batch_size < 1 or args.resolution < 8:
        print("rn50 show-batch: error: --batch-size must be >= 1 and --resolution >= 8", file=sys.stderr)
        return 2
    from dataset_tools.files import check_writable

    try:
        check_writable(args.out)  # before the loader and the batch: they are the slow part
    except OSError as e:
        print(f"rn50 show-batch: error: --out {args.out}: cannot write there ({e.strerror or e}); choose another path",
              file=sys.stderr)
        return 2
    import torch

    import pipeline

    build_loader = pipeline.build_loader
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    data_dir = Path(args.data_dir)
    try:
        loader = build_loader(data_dir, split=args.split, backend=args.backend, batch_size=args.batch_size,
                              resolution=args.resolution, workers=args.workers, device=device, dtype=torch.float32,
                              seed=args.seed, drop_last=False)
        loader.set_epoch(args.epoch)
        images, labels = next(iter(loader))
    except (OSError, ValueError, RuntimeError) as e:
        print(f"rn50 show-batch: error: {(str(e) or type(e).__name__).splitlines()[0]}", file=sys.stderr)
        return 2
    images, targets = augment_batch(images, labels, augments, loader.num_classes, args.seed)
    out = Path(args.out)
    title = (f"{data_dir.name}/{args.split} via {loader.backend}, {args.resolution} px, epoch {args.epoch}"
             + (f", augment {'+'.join(augments)}" if augments else ""))
    try:
        draw(images, targets, class_names(data_dir, loader.classes), out, title)
    except OSError as e:
        fix = "free space there" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "choose another --out"
        print(f"rn50 show-batch: error: cannot write {e.filename or out} ({e.strerror or e}); {fix}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({len(images)} images, labels {sorted(set(labels.tolist()))[:10]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
