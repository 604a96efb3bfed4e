"""`rn50 eval`: top-1/top-5 of a checkpoint, or of a plain state dict, on a validation split.

    rn50 eval --checkpoint checkpoints/my-run/best.pt --data-dir /data/betons
    rn50 eval --checkpoint checkpoints/my-run/best.pt --data-dir /data/imagenet --val-res 288 --tta --ema
    rn50 eval --weights resnet50-0676ba61.pth --arch resnet50 --data-dir /data/betons

--checkpoint: the model is rebuilt from the config saved in the checkpoint (arch, BlurPool, classes); the dataset's
class list must match the one the model was trained on. --weights: a state dict with torchvision's keys
(torchvision's or timm's published weights, an rn50 export's weights.pt; BlurPool layers are recognised by their
keys), evaluated at --val-res (default 224) without TTA unless asked; its class count must be the dataset's, and an
export's classes.json beside it must name the dataset's classes. Both use the same validation loader and centre crop
(--crop-ratio, default 224/256), and say which preprocessing they assumed. Prints the result and writes it as JSON
(--out, default next to the checkpoint or weights: eval_<file>_<res>px[_tta][_ema].json). Works under torchrun too
(each sample counted once).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from dataset_tools.files import DataFolderError, check_writable
from training.config import ARCHS, DEVICES, LOADERS, PRECISIONS, Parser
from training.preflight import DataError, dataset_classes

PROG = "rn50 eval"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", help="a checkpoint.pt / best.pt / model_XXX.pt of rn50 train")
    what.add_argument("--weights", help="a plain state dict (torch.save) with torchvision's keys; needs --arch")
    p.add_argument("--arch", choices=ARCHS, default=None, help="the ResNet of --weights")
    p.add_argument("--data-dir", required=True, help="folder with val.beton (+classes.json) or val/<wnid>/")
    p.add_argument(
        "--val-res", type=int, default=None, help="evaluation resolution (default: the run's val_res; --weights: 224)"
    )
    p.add_argument(
        "--crop-ratio",
        type=float,
        default=None,
        help="centre crop side / shorter side before resizing to --val-res (default 224/256 = 0.875, torchvision's "
        "Resize(256) + CenterCrop(224); torchvision's IMAGENET1K_V2 weights were evaluated at 224/232 = 0.9655)",
    )
    p.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="add the logits of the flipped image (default: the run's setting; --weights: off)",
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
    ckpt_path = Path(args.checkpoint or args.weights)
    try:
        if args.weights is not None:
            if args.arch is None:
                raise DataError("--weights needs --arch (the ResNet the state dict is for, e.g. --arch resnet50)")
            if args.ema:
                raise DataError("--ema reads the EMA weights of a checkpoint; a --weights file is one set of weights")
            if not ckpt_path.is_file():
                raise DataError(f"--weights {ckpt_path}: no such file (a state dict saved with torch.save)")
        else:
            if args.arch is not None:
                raise DataError("--arch goes with --weights; a checkpoint names its own arch")
            if not ckpt_path.is_file():
                raise DataError(f"--checkpoint {ckpt_path}: no such file (runs keep them in checkpoints/<run>/)")
        if args.batch_size < 1 or args.workers < 0 or (args.val_res is not None and args.val_res < 8):
            raise DataError("--batch-size must be >= 1, --workers >= 0, --val-res >= 8")
        if args.crop_ratio is not None and not 0 < args.crop_ratio <= 1:
            raise DataError(
                f"--crop-ratio must be in (0, 1] (the crop's side / the shorter side), got {args.crop_ratio}"
            )
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


# the resize each backend applies to the centre crop (what differs from torchvision's preset besides rounding)
RESIZE_FILTERS = {
    "torchvision": "PIL bilinear, antialiased",
    "ffcv": "OpenCV area averaging",
    "dali": "DALI linear, antialiased",
}


class Refused(ValueError):
    """What to evaluate does not fit the data or the flags; one line."""


def _from_checkpoint(args: argparse.Namespace, path: Path, classes: list[str], ctx):
    """(model, config, result fields, description) of a checkpoint: its own config, this command's data settings."""
    import dataclasses

    from training.checkpoint import Checkpoint
    from training.config import from_dict
    from training.model import build_model

    try:
        saved = Checkpoint.read(path, map_location=ctx.device)
    except (FileNotFoundError, ValueError) as e:
        raise Refused(str(e)) from None
    trained_classes = saved.classes
    if trained_classes and trained_classes != classes:
        raise Refused(
            f"{args.data_dir} has {len(classes)} classes"
            f"{'' if len(classes) != len(trained_classes) else ' in a different order or naming'}, the model "
            f"was trained on {len(trained_classes)}; evaluate on the dataset the run used"
        )
    if args.ema and not saved.ema:
        raise Refused(f"{path} holds no EMA weights (the run had --no-ema)")
    cfg = dataclasses.replace(
        from_dict(saved.config, f"{path} config"),
        data_dir=str(args.data_dir),
        loader=args.loader,
        workers=args.workers,
        val_batch_size=args.batch_size,
        skip_listed_in="",
        seed=0,
    )
    model = build_model(cfg.arch, len(classes), blurpool=cfg.blurpool, channels_last=cfg.channels_last)
    model.load_state_dict(saved.weights(ema=args.ema))
    fields = {"checkpoint": str(path), "epoch": saved.finished_epoch}
    return model, cfg, fields, f"epoch {saved.finished_epoch}, {cfg.arch}{', EMA' if args.ema else ''}"


def _from_weights(args: argparse.Namespace, path: Path, classes: list[str]):
    """(model, config, result fields, description) of a plain state dict for --arch: the default config's
    validation settings (224 px, no TTA) with this command's data settings."""
    from training.config import TrainConfig
    from training.export import CLASSES, is_export
    from training.model import build_model
    from training.weights import WeightsError, has_blurpool, load_into, num_classes_of, read_state_dict

    try:
        state = read_state_dict(path)
        k = num_classes_of(state, path)
        if k != len(classes):
            raise Refused(
                f"{path}: {k} classes (fc.weight {tuple(state['fc.weight'].shape)}), but {args.data_dir} has "
                f"{len(classes)}; evaluate it on the dataset it was trained for"
            )
        if is_export(path.parent):  # an rn50 export names its classes: they must be the dataset's, in its order
            named = json.loads((path.parent / CLASSES).read_text())
            if named != classes:
                raise Refused(
                    f"{path.parent / CLASSES} names other classes (or another order) than {args.data_dir}; "
                    "evaluate on the dataset the run used"
                )
        blur = has_blurpool(state)
        model = build_model(args.arch, k, blurpool=blur, channels_last=True)
        load_into(model, state, path, f"{args.arch}{' + BlurPool' if blur else ''} with {k} classes")
    except (WeightsError, OSError, ValueError) as e:
        raise Refused(str(e)) from None
    cfg = TrainConfig(
        data_dir=str(args.data_dir),
        loader=args.loader,
        workers=args.workers,
        val_batch_size=args.batch_size,
        arch=args.arch,
        blurpool=blur,
    )
    fields = {"weights": str(path), "epoch": None}
    return model, cfg, fields, f"{args.arch}{' + BlurPool' if blur else ''} state dict"


def stored_as(data_dir: str | Path, backend: str) -> str:
    """How the betons' images were stored (convert_report.json's settings), for the preprocessing line."""
    if backend == "torchvision":
        return ""
    try:
        settings = json.loads((Path(data_dir) / "convert_report.json").read_text())["settings"]
        side = f"max side {settings['max_res']} px" if settings.get("max_res") else "original size"
        share = round(100 * float(settings["compress_prob"]))
        return f"; the beton stores them at {side}, {share}% re-encoded as JPEG q{settings['jpeg_quality']}"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def preprocessing_line(backend: str, crop_ratio: float, val_res: int, tta: bool, data_dir: str | Path) -> str:
    from pipeline.contract import IMAGENET_MEAN, IMAGENET_STD

    mean = ", ".join(f"{m / 255:.3f}" for m in IMAGENET_MEAN)
    std = ", ".join(f"{v / 255:.3f}" for v in IMAGENET_STD)
    flipped = "; plus the logits of the flipped image" if tta else ""
    return (
        f"preprocessing: RGB; the centre square of {crop_ratio:.4g} x the shorter side resized to {val_res} px "
        f"({RESIZE_FILTERS.get(backend, backend)}, {backend} loader{stored_as(data_dir, backend)}), as torchvision's "
        f"Resize({round(val_res / crop_ratio)}) + CenterCrop({val_res}) up to rounding and the filter; ImageNet mean "
        f"({mean}) and std ({std}){flipped}"
    )


def run_eval(args: argparse.Namespace, ckpt_path: Path, classes: list[str]) -> int:
    from training.distributed import DeviceError, cleanup, init_distributed

    try:
        ctx = init_distributed(args.device)
    except DeviceError as e:
        return _error(e)
    try:
        return _evaluate_and_report(args, ckpt_path, classes, ctx)
    finally:
        cleanup()


def _error(e: Exception) -> int:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return 2


def _model_to_evaluate(args: argparse.Namespace, path: Path, classes: list[str], ctx):
    """(model, config, result fields, description) of --checkpoint or --weights."""
    if args.weights is None:
        return _from_checkpoint(args, path, classes, ctx)
    return _from_weights(args, path, classes)


def _settings(args: argparse.Namespace, cfg, device):
    """(precision, val_res, tta, crop_ratio): this command's flags where given, else the model's config's."""
    from pipeline.contract import VAL_CROP_RATIO
    from training.engine import resolve_precision

    precision = resolve_precision(args.precision, device)
    val_res = args.val_res or cfg.val_res
    tta = cfg.tta if args.tta is None else args.tta
    crop_ratio = VAL_CROP_RATIO if args.crop_ratio is None else args.crop_ratio
    return precision, val_res, tta, crop_ratio


def _evaluate_and_report(args: argparse.Namespace, ckpt_path: Path, classes: list[str], ctx) -> int:
    """Every rank evaluates its share; the main rank reports the whole."""
    from training.components import make_loader
    from training.engine import evaluate

    try:
        model, cfg, fields, desc = _model_to_evaluate(args, ckpt_path, classes, ctx)
    except Refused as e:
        return _error(e)
    precision, val_res, tta, crop_ratio = _settings(args, cfg, ctx.device)
    model.to(ctx.device)
    try:
        loader = make_loader(cfg, "val", ctx, precision.input_dtype, resolution=val_res, val_crop_ratio=args.crop_ratio)
        if ctx.is_main:
            print(preprocessing_line(loader.backend, crop_ratio, val_res, tta, args.data_dir), flush=True)
        t0 = time.perf_counter()
        result = evaluate(model, loader, precision, ctx, tta=tta)
    except DataFolderError as e:  # e.g. a val folder where no image decodes: one line, not a traceback
        return _error(e)
    seconds = time.perf_counter() - t0
    if not ctx.is_main:
        return 0
    result.update(
        {
            **fields,
            "data_dir": str(args.data_dir),
            "loader": loader.backend,
            "val_res": val_res,
            "crop_ratio": crop_ratio,
            "tta": tta,
            "ema": args.ema,
            "precision": precision.name,
            "arch": cfg.arch,
            "seconds": seconds,
        }
    )
    return _report(args, ckpt_path, desc, result)


def _result_path(args: argparse.Namespace, ckpt_path: Path, result: dict) -> Path:
    """--out, else eval_<file>_<res>px[_crop<ratio>][_tta][_ema].json beside the evaluated file: one file per
    setting, so evaluating at another setting keeps the earlier result."""
    suffix = (
        f"{result['val_res']}px"
        + ("" if args.crop_ratio is None else f"_crop{result['crop_ratio']:.4g}")
        + ("_tta" if result["tta"] else "")
        + ("_ema" if args.ema else "")
    )
    return Path(args.out) if args.out else ckpt_path.with_name(f"eval_{ckpt_path.stem}_{suffix}.json")


def _report(args: argparse.Namespace, ckpt_path: Path, desc: str, result: dict) -> int:
    """The result on screen, then as JSON; exit status 1 if only the file could not be written."""
    out = _result_path(args, ckpt_path, result)
    print(
        f"{ckpt_path} ({desc}) on {result['samples']} val images at {result['val_res']} px"
        f"{' + flip TTA' if result['tta'] else ''}: "
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


if __name__ == "__main__":
    sys.exit(main())
