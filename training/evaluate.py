"""`rn50 eval`: top-1/top-5 of a checkpoint on a validation split.

    rn50 eval --checkpoint checkpoints/my-run/best.pt --data-dir /data/betons
    rn50 eval --checkpoint checkpoints/my-run/best.pt --data-dir /data/imagenet --val-res 288 --tta --ema

The model is rebuilt from the config saved in the checkpoint (arch, BlurPool, classes); the dataset's class list
must match the one the model was trained on. Prints the result and writes it as JSON (--out, default next to the
checkpoint: eval_<checkpoint>_<res>px[_tta][_ema].json). Works under torchrun too (each sample counted once).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from dataset_tools.files import DataFolderError, check_writable
from training.config import DEVICES, LOADERS, PRECISIONS, Parser
from training.preflight import DataError, dataset_classes

PROG = "rn50 eval"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="a checkpoint.pt / best.pt / model_XXX.pt of rn50 train")
    p.add_argument("--data-dir", required=True, help="folder with val.beton (+classes.json) or val/<wnid>/")
    p.add_argument("--val-res", type=int, default=None, help="evaluation resolution (default: the run's val_res)")
    p.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="add the logits of the flipped image (default: the run's setting)",
    )
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights stored in the checkpoint")
    p.add_argument("--batch-size", type=int, default=256, help="per GPU (default 256)")
    p.add_argument("--workers", type=int, default=8, help="loader workers (default 8)")
    p.add_argument("--loader", default="auto", choices=LOADERS, help="loader backend (default auto)")
    p.add_argument("--device", default="auto", choices=DEVICES, help="default: cuda if available")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="default: as in training")
    p.add_argument("--out", default=None, help="JSON result path")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ckpt_path = Path(args.checkpoint)
    try:
        if not ckpt_path.is_file():
            raise DataError(f"--checkpoint {ckpt_path}: no such file (runs keep them in checkpoints/<run>/)")
        if args.batch_size < 1 or args.workers < 0 or (args.val_res is not None and args.val_res < 8):
            raise DataError("--batch-size must be >= 1, --workers >= 0, --val-res >= 8")
        classes = dataset_classes(args.data_dir, args.loader, splits=("val",))
        # the result's file must be writable before minutes of evaluation, not after
        probe = Path(args.out) if args.out else ckpt_path.with_name(f"eval_{ckpt_path.stem}.json")
        try:
            check_writable(probe)
        except OSError as e:
            where = "--out" if args.out else "the checkpoint's folder (the result's default place; pass --out)"
            raise DataError(f"{where} {probe}: cannot write there ({e.strerror or e})") from None
    except DataError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return run_eval(args, ckpt_path, classes)


def run_eval(args: argparse.Namespace, ckpt_path: Path, classes: list[str]) -> int:
    import dataclasses

    from training.checkpoint import Checkpoint
    from training.components import make_loader
    from training.config import from_dict
    from training.distributed import cleanup, init_distributed
    from training.engine import evaluate, resolve_precision
    from training.model import build_model

    ctx = init_distributed(args.device)
    try:
        try:
            saved = Checkpoint.read(ckpt_path, map_location=ctx.device)
        except (FileNotFoundError, ValueError) as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 2
        trained_classes = saved.classes
        if trained_classes and trained_classes != classes:
            print(
                f"{PROG}: error: {args.data_dir} has {len(classes)} classes"
                f"{'' if len(classes) != len(trained_classes) else ' in a different order or naming'}, the model "
                f"was trained on {len(trained_classes)}; evaluate on the dataset the run used",
                file=sys.stderr,
            )
            return 2
        if args.ema and not saved.ema:
            print(f"{PROG}: error: {ckpt_path} holds no EMA weights (the run had --no-ema)", file=sys.stderr)
            return 2
        # the run's own config, with this command's data and loader settings
        cfg = dataclasses.replace(
            from_dict(saved.config, f"{ckpt_path} config"),
            data_dir=str(args.data_dir),
            loader=args.loader,
            workers=args.workers,
            val_batch_size=args.batch_size,
            skip_listed_in="",
            seed=0,
        )
        precision = resolve_precision(args.precision, ctx.device)
        val_res = args.val_res or cfg.val_res
        tta = cfg.tta if args.tta is None else args.tta
        model = build_model(cfg.arch, len(classes), blurpool=cfg.blurpool, channels_last=cfg.channels_last)
        model.load_state_dict(saved.weights(ema=args.ema))
        model.to(ctx.device)
        try:
            loader = make_loader(cfg, "val", ctx, precision.input_dtype, resolution=val_res)
            t0 = time.perf_counter()
            result = evaluate(model, loader, precision, ctx, tta=tta)
        except DataFolderError as e:  # e.g. a val folder where no image decodes: one line, not a traceback
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 2
        seconds = time.perf_counter() - t0
        if not ctx.is_main:
            return 0
        result.update(
            {
                "checkpoint": str(ckpt_path),
                "epoch": saved.finished_epoch,
                "data_dir": str(args.data_dir),
                "loader": loader.backend,
                "val_res": val_res,
                "tta": tta,
                "ema": args.ema,
                "precision": precision.name,
                "arch": cfg.arch,
                "seconds": seconds,
            }
        )
        suffix = f"{val_res}px" + ("_tta" if tta else "") + ("_ema" if args.ema else "")
        out = Path(args.out) if args.out else ckpt_path.with_name(f"eval_{ckpt_path.stem}_{suffix}.json")
        print(
            f"{ckpt_path} (epoch {saved.finished_epoch}, {cfg.arch}{', EMA' if args.ema else ''}) on "
            f"{result['samples']} val images at {val_res} px{' + flip TTA' if tta else ''}: "
            f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}",
            flush=True,
        )
        try:  # the result is on screen first: a failed write loses no evaluation
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1) + "\n")
        except OSError as e:
            print(f"{PROG}: error: could not write {out} ({e.strerror or e}); the result is above", file=sys.stderr)
            return 1
        print(f"written: {out}", flush=True)
        return 0
    finally:
        cleanup()


if __name__ == "__main__":
    sys.exit(main())
