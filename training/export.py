"""`rn50 export`: a trained checkpoint as a folder that works without this project.

    rn50 export checkpoints/my-run/best.pt --out exports/my-run
    rn50 export checkpoints/my-run/checkpoint.pt --out exports/my-run-ema --ema --overwrite

OUT/ holds
    weights.pt      the plain state dict (torch.save, fp32). Without BlurPool it loads unchanged into
                    torchvision.models.<arch>(num_classes=K), and so into timm's ResNet of that depth (same keys);
                    with BlurPool its keys name the blur layers, which torchvision's ResNets do not have
    model.pt2       the whole network as a torch.export program, any run (BlurPool included), fp32, any batch size
                    and any image above 32 px a side: torch.export.load("OUT/model.pt2").module()(images) needs
                    only torch
    classes.json    the class names, index = output
    model_card.json, MODEL_CARD.md   arch, classes, the resolved training config, epochs, the checkpoint's last
                    validation top-1/top-5 with its resolution and TTA, the dataset's manifest fingerprint, hardware
                    and wall time from the run's logs, and the preprocessing the model expects

The folder is written under a temporary name and renamed into place when complete; an existing OUT is refused
unless --overwrite, which replaces only an earlier export (or an empty folder).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from training.config import Parser

PROG = "rn50 export"
FORMAT = "rn50-export/1"
CARD_JSON = "model_card.json"
CARD_MD = "MODEL_CARD.md"
WEIGHTS = "weights.pt"
PROGRAM = "model.pt2"
CLASSES = "classes.json"


class ExportError(ValueError):
    """One line naming the file and the fix."""


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint.pt / best.pt / model_XXX.pt of rn50 train")
    p.add_argument("--out", required=True, help="the folder to write (must not exist, unless --overwrite)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights stored in the checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it holds an earlier rn50 export")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ckpt, out = Path(args.checkpoint), Path(args.out)
    try:
        if not ckpt.is_file():
            raise ExportError(f"{ckpt}: no such file (a run keeps its checkpoints in <output-dir>/checkpoints/<run>/)")
        recover_interrupted(out)
        check_target(out, args.overwrite)
        return export(ckpt, out, ema=args.ema)
    except ExportError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------------------------------------- the target folder


def _tmp(out: Path, kind: str, pid: int | None = None) -> Path:
    return out.parent / f".{out.name}.{kind}-{pid if pid is not None else os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def recover_interrupted(out: Path) -> None:
    """Leftovers of an export killed mid-way: its unfinished folder is removed; a previous export it had moved aside
    to replace (--overwrite) is moved back when OUT is missing, so a kill never loses a finished export."""
    if not out.parent.is_dir():
        return
    for kind in ("old", "tmp"):
        for left in out.parent.glob(f".{out.name}.{kind}-*"):
            pid = left.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or _alive(int(pid)):
                continue
            if kind == "old" and not out.exists():
                os.replace(left, out)
                print(f"restored {out}, the export an interrupted --overwrite had moved aside", flush=True)
            else:
                shutil.rmtree(left, ignore_errors=True)


def is_export(folder: Path) -> bool:
    try:
        return json.loads((folder / CARD_JSON).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_target(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not overwrite:
        raise ExportError(f"--out {out}: already exists; pass --overwrite to replace it, or choose another --out")
    if not out.is_dir():
        raise ExportError(f"--out {out}: a file, not a folder; choose another --out")
    if not is_export(out) and any(out.iterdir()):
        raise ExportError(
            f"--out {out}: not an rn50 export (no {CARD_JSON} of one) and not empty; --overwrite replaces only "
            "earlier exports: choose another --out"
        )


def commit(tmp: Path, out: Path) -> None:
    """tmp becomes out. A previous out is moved aside first and deleted last: killed in between, the next export
    into out puts it back (recover_interrupted)."""
    if out.exists():
        old = _tmp(out, "old")
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            os.replace(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


# ---------------------------------------------------------------------------------------------- the export


def export(ckpt: Path, out: Path, ema: bool = False) -> int:
    saved, cfg = _read_checkpoint(ckpt, ema)
    weights = _plain_weights(saved, ema)
    num_classes = int(weights["fc.weight"].shape[0]) if "fc.weight" in weights else len(saved.classes)
    classes = saved.classes or [f"class_{i}" for i in range(num_classes)]
    what = f"{cfg.arch}{' + BlurPool' if cfg.blurpool else ''} with {num_classes} classes"
    model = _loaded_model(cfg, num_classes, weights, ckpt, what)
    t0 = time.perf_counter()
    # everything that can fail for another reason than the disk, before anything is written
    torchvision_ok = _check_torchvision(cfg.arch, num_classes, weights) if not cfg.blurpool else False
    timm_ok = _check_timm(cfg.arch, num_classes, weights) if torchvision_ok else None
    program, shapes = _trace_program(model, cfg.val_res)
    card = model_card(
        saved,
        cfg,
        ckpt,
        ema=ema,
        num_classes=num_classes,
        torchvision_loads=torchvision_ok,
        timm_loads=timm_ok,
        shapes=shapes,
    )
    _write_export(out, weights, classes, program, card, model, cfg.val_res)
    _print_summary(ckpt, out, card, what, torchvision_ok, time.perf_counter() - t0)
    return 0


def _read_checkpoint(ckpt: Path, ema: bool):
    """(the checkpoint, its config); each way of being unusable is one ExportError line."""
    from training.checkpoint import Checkpoint
    from training.config import ConfigError, from_dict

    try:
        saved = Checkpoint.read(ckpt)
    except (FileNotFoundError, ValueError) as e:
        raise ExportError(str(e)) from None
    try:
        cfg = from_dict(saved.config, f"{ckpt} config")
    except ConfigError as e:
        raise ExportError(str(e)) from None
    if ema and not saved.ema:
        raise ExportError(f"{ckpt}: holds no EMA weights (the run had --no-ema); export without --ema")
    return saved, cfg


def _plain_weights(saved, ema: bool) -> dict:
    """The state dict as the export promises it: on the CPU and fp32 whatever the run trained in, so it loads
    anywhere without a map_location or a cast."""
    import torch

    return {
        k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
        for k, v in saved.weights(ema=ema).items()
    }


def _loaded_model(cfg, num_classes: int, weights: dict, ckpt: Path, what: str):
    """The run's network with the weights in, in eval mode: what gets traced and what the program is checked
    against."""
    from training.model import build_model
    from training.weights import WeightsError, check_fits

    model = build_model(cfg.arch, num_classes, blurpool=cfg.blurpool, channels_last=False)
    try:
        check_fits(model, weights, ckpt, what + " (as its own config says)")
    except WeightsError as e:
        raise ExportError(f"{e}; the checkpoint is damaged, or its config was edited") from None
    model.load_state_dict(weights)
    model.eval()
    return model


def _write_export(out: Path, weights: dict, classes: list[str], program, card: dict, model, resolution: int) -> None:
    """Every file into a temporary folder beside out, renamed into place once complete: a failure half-way leaves
    the previous export (or nothing), never a partial one."""
    import torch

    tmp = _make_tmp(out)
    try:
        torch.save(weights, tmp / WEIGHTS)
        (tmp / CLASSES).write_text(json.dumps(classes, indent=1) + "\n")
        torch.export.save(program, tmp / PROGRAM)
        _check_program(tmp / PROGRAM, model, resolution)
        (tmp / CARD_JSON).write_text(json.dumps(card, indent=1) + "\n")
        (tmp / CARD_MD).write_text(card_markdown(card))
        commit(tmp, out)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        previous = "the previous export is intact" if out.exists() else "nothing was written"
        raise ExportError(f"--out {out}: could not write the export ({_short_reason(e)}); {previous}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _make_tmp(out: Path) -> Path:
    tmp = _tmp(out, "tmp")
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise ExportError(
            f"--out {out}: cannot write in {out.parent} ({e.strerror or e}); choose another --out"
        ) from None
    return tmp


def _short_reason(e: Exception) -> str:
    """An OSError's strerror, else the first line of the message: torch's errors can run to many lines."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return (str(e).strip().splitlines() or [""])[0][:200]


def _print_summary(ckpt: Path, out: Path, card: dict, what: str, torchvision_ok: bool, seconds: float) -> None:
    loads = (
        f"loads into torchvision.models.{card['arch']}(num_classes={card['num_classes']})"
        if torchvision_ok
        else "keys of the BlurPool layers: use model.pt2 outside this project"
    )
    epochs = card["training"]["epochs_trained"]
    print(
        f"exported {ckpt} ({what}, {'EMA, ' if card['weights'] == 'ema' else ''}{epochs} "
        f"epoch{'s' if epochs != 1 else ''}) to {out} in {seconds:.1f} s:\n"
        f"  {WEIGHTS}   plain state dict; {loads}\n"
        f"  {PROGRAM}    torch.export program: torch.export.load('{out / PROGRAM}').module()(images)\n"
        f"  {CLASSES}, {CARD_JSON}, {CARD_MD}",
        flush=True,
    )


def _check_torchvision(arch: str, num_classes: int, weights: dict) -> bool:
    """The claim the card makes, made true at export time: the state dict loads into torchvision's own module."""
    import torchvision

    getattr(torchvision.models, arch)(weights=None, num_classes=num_classes).load_state_dict(weights)
    return True


def _check_timm(arch: str, num_classes: int, weights: dict) -> bool | None:
    """timm's ResNets name their layers as torchvision's do; checked where timm is installed (None: it is not)."""
    import importlib.util

    if importlib.util.find_spec("timm") is None:
        return None
    import timm

    timm.create_model(arch, pretrained=False, num_classes=num_classes).load_state_dict(weights)
    return True


# Traced at this size, the program accepts any image above 32 px a side: torch.export specialises a dimension that
# is 1 when traced, and a ResNet's last feature map is 1 x 1 for inputs of 32 px and less.
TRACE_RES = 224
MIN_FREE_RES = 33


def _trace_program(model, resolution: int):
    """(torch.export program, the input shapes it accepts for the card): the batch size free and, where torch can,
    the height and width (ResNets pool globally)."""
    import torch
    from torch.export import Dim

    # Dim.AUTO lets torch.export derive the height/width constraints (a named Dim fails on the stride arithmetic);
    # a torch without it, or a model evaluated at 32 px or less, gets a program of fixed image size.
    auto = getattr(Dim, "AUTO", None) if resolution >= MIN_FREE_RES else None
    trace = TRACE_RES if auto is not None else resolution
    example = torch.randn(2, 3, trace, trace, generator=torch.Generator().manual_seed(0))
    free = {0: Dim("batch", min=1), **({2: auto, 3: auto} if auto is not None else {})}
    with torch.no_grad():
        program = torch.export.export(model, (example,), dynamic_shapes=(free,))
    if auto is None:
        return program, f"(any batch, 3, {resolution}, {resolution})"
    return program, f"(any batch, 3, height, width) with height and width of {MIN_FREE_RES} px or more"


def _check_program(path: Path, model, resolution: int) -> None:
    """The saved program, loaded back, against the model on another batch size than traced, at the model's own
    resolution."""
    import torch

    probe = torch.randn(3, 3, resolution, resolution, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = model(probe), torch.export.load(path).module()(probe)
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max().clamp(min=1))):
        raise ExportError(
            f"{path.name}: the exported program's logits differ from the model's by "
            f"{float((got - want).abs().max()):.3g}; report it with your torch version ({torch.__version__})"
        )


# ---------------------------------------------------------------------------------------------- the model card


def _run_logs(ckpt: Path, cfg) -> Path | None:
    """The run's log folder: beside the checkpoint's output dir (<out>/checkpoints/<run>/x.pt -> <out>/logs/<run>),
    else where the config says (relative to where the run was started)."""
    for logs in (
        ckpt.resolve().parent.parent.parent / "logs" / ckpt.resolve().parent.name,
        Path(cfg.output_dir) / "logs" / cfg.run_name,
    ):
        if (logs / "training_log.json").is_file():
            return logs
    return None


def _hardware_and_time(logs: Path | None, last_epoch: int) -> tuple[str | None, float | None, str]:
    if logs is None:
        return None, None, "the run's logs were not found (logs/<run>/training_log.json beside checkpoints/)"
    hardware = None
    try:
        for line in (logs / "training_log.md").read_text().splitlines():
            if line.startswith("- hardware:"):
                hardware = line.removeprefix("- hardware:").strip()
                break
        records = json.loads((logs / "training_log.json").read_text())
        seconds = sum(float(r.get("epoch_time_s") or 0) for r in records if r.get("epoch", 1e9) <= last_epoch)
    except (OSError, ValueError, TypeError, AttributeError) as e:
        return hardware, None, f"{logs}: could not be read ({e})"
    return hardware, seconds, f"sum of the epoch times (training + validation) of epochs 0..{last_epoch} in {logs}"


def _data(cfg, classes: list[str]) -> dict:
    from dataset_tools.beton_folder import MANIFEST_NAME

    d = Path(cfg.data_dir)
    entry: dict = {"data_dir": cfg.data_dir, "manifest": None}
    path = d / MANIFEST_NAME
    if not path.is_file():
        entry["note"] = f"no {MANIFEST_NAME} in {d} now (image folders, betons of FFCV's own writer, or moved)"
        return entry
    try:
        manifest = json.loads(path.read_text())
        splits = {s: {k: v.get(k) for k in ("samples", "bytes", "index")} for s, v in dict(manifest["splits"]).items()}
        same = list(manifest.get("classes") or []) == list(classes)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        entry["note"] = f"{path}: could not be read ({e})"
        return entry
    entry["manifest"] = {"path": str(path), "classes": len(manifest.get("classes") or []), "splits": splits}
    entry["note"] = "read at export time" + (
        "" if same else "; its class list differs from the model's: the folder was converted again since the run"
    )
    return entry


def preprocessing(val_res: int, tta: bool) -> dict:
    from pipeline.contract import IMAGENET_MEAN, IMAGENET_STD, VAL_CROP_RATIO

    resize = round(val_res / VAL_CROP_RATIO)
    return {
        "input": "float32 tensor (batch, 3, height, width), RGB channel order, pixel values / 255, then normalised",
        "mean": [round(m / 255, 6) for m in IMAGENET_MEAN],
        "std": [round(s / 255, 6) for s in IMAGENET_STD],
        "resolution": val_res,
        "crop_ratio": VAL_CROP_RATIO,
        "crop": (
            f"the centre square of int({VAL_CROP_RATIO:g} x shorter side) pixels, resized to {val_res} x {val_res} "
            "with an antialiased filter (PIL bilinear, OpenCV area or DALI linear, as the loader has it)"
        ),
        "torchvision_equivalent": (
            f"transforms.Resize({resize}), transforms.CenterCrop({val_res}), transforms.ToTensor(), "
            "transforms.Normalize(mean, std)  (the same crop up to a pixel of rounding)"
        ),
        "tta": "add the logits of the horizontally flipped image" if tta else "none",
    }


def model_card(
    saved,
    cfg,
    ckpt: Path,
    *,
    ema: bool,
    num_classes: int,
    torchvision_loads: bool,
    timm_loads: bool | None,
    shapes: str,
) -> dict:
    import torch
    import torchvision

    from training.config import to_dict

    hardware, seconds, how = _hardware_and_time(_run_logs(ckpt, cfg), _last_validated_epoch(saved))
    return {
        "format": FORMAT,
        "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "checkpoint": str(ckpt),
        "run_name": saved.state.get("run_name") or cfg.run_name,
        "arch": cfg.arch,
        "blurpool": cfg.blurpool,
        "num_classes": num_classes,
        "classes": saved.classes or None,
        "weights": "ema" if ema else "model",
        "files": _card_files(shapes),
        "state_dict_loads_into": _loads_into(cfg.arch, num_classes, torchvision_loads, timm_loads),
        "blurpool_note": BLURPOOL_NOTE if cfg.blurpool else None,
        "training": {"epochs_trained": saved.finished_epoch + 1, "epochs_planned": cfg.epochs, "config": to_dict(cfg)},
        "validation": _validation(saved, cfg, ema),
        "data": _data(cfg, saved.classes),
        "hardware": hardware,
        "wall_time_s": seconds,
        "wall_time_note": how,
        "preprocessing": preprocessing(cfg.val_res, cfg.tta),
    }


def _last_validated_epoch(saved) -> int:
    """The epoch the card's numbers are of, so the wall time covers the same epochs (a mid-epoch checkpoint's
    record is of the epoch before)."""
    rec = saved.metrics or {}
    return rec.get("epoch", saved.finished_epoch) if rec else saved.finished_epoch


BLURPOOL_NOTE = (
    "the state dict holds BlurPool layers (a fixed 3x3 binomial blur before every strided conv after the "
    "stem: <conv>.conv.weight and <conv>.blur_filter); torchvision's ResNets have none, so use model.pt2"
)


def _card_files(shapes: str) -> dict:
    return {
        WEIGHTS: "plain state dict (torch.save, fp32): torch.load(path, weights_only=True)",
        PROGRAM: f"torch.export program (fp32, inference mode, input {shapes}): "
        "torch.export.load(path).module()(images); do not call .eval() on it (torch refuses: it is already "
        "in inference mode)",
        CLASSES: "class names, index = output",
    }


def _loads_into(arch: str, num_classes: int, torchvision_loads: bool, timm_loads: bool | None) -> list[str]:
    """The modules the state dict was loaded into at export time: the card claims only what was checked."""
    loads = [f"torchvision.models.{arch}(num_classes={num_classes})"] if torchvision_loads else []
    if timm_loads:
        loads.append(f"timm.create_model('{arch}', num_classes={num_classes})")
    elif torchvision_loads:  # not checked, so not claimed: timm's ResNets use torchvision's key names
        loads.append(f"timm's {arch} has the same keys (not checked at export: timm is not installed)")
    return loads


def _validation(saved, cfg, ema: bool) -> dict | None:
    """The checkpoint's last validation record, for the weights exported (the EMA's record has top-1 only)."""
    rec = saved.metrics or {}
    if not rec:
        return None
    val = {
        "epoch": rec.get("epoch"),
        "weights": "ema" if ema else "model",
        "top1": rec.get("ema_top1") if ema else rec.get("val_top1"),
        "top5": None if ema else rec.get("val_top5"),
        "loss": None if ema else rec.get("val_loss"),
        "samples": rec.get("val_samples"),
        "resolution": rec.get("val_res", cfg.val_res),
        "tta": cfg.tta,
    }
    if saved.phase != "end_of_epoch":
        val["note"] = (
            f"validated after epoch {rec.get('epoch')}; this checkpoint was written later, mid-way through the "
            "next epoch, so these numbers are of slightly earlier weights"
        )
    return val


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "not found"
    return f"{seconds:.0f} s" if seconds < 3600 else f"{seconds / 3600:.2f} h"


def card_markdown(card: dict) -> str:
    """MODEL_CARD.md: model_card.json for people, a function a section."""
    arch = f"{card['arch']}{' + BlurPool' if card['blurpool'] else ''}"
    lines = [
        f"# {card['run_name']}: {arch}, {card['num_classes']} classes",
        "",
        f"Exported by `rn50 export` from `{card['checkpoint']}` ({card['weights']} weights) on {card['exported']}, "
        f"torch {card['torch']}, torchvision {card['torchvision']}.",
        "",
        *_section("Files", [f"- `{name}`: {text}" for name, text in card["files"].items()]),
        *_section("Loading", _md_loading(card)),
        *_section("Preprocessing", _md_preprocessing(card["preprocessing"])),
        *_section("Validation", _md_validation(card["validation"])),
        *_section("Training", _md_training(card)),
    ]
    return "\n".join(lines)


def _section(title: str, body: list[str]) -> list[str]:
    return [f"## {title}", "", *body, ""]


def _md_loading(card: dict) -> list[str]:
    lines = ["```python", "import json, torch"]
    lines += [f"classes = json.load(open('{CLASSES}'))", f"model = torch.export.load('{PROGRAM}').module()"]
    if card["state_dict_loads_into"]:
        lines += [
            "# or, with torchvision:",
            "import torchvision",
            f"model = torchvision.models.{card['arch']}(num_classes={card['num_classes']})",
            f"model.load_state_dict(torch.load('{WEIGHTS}', weights_only=True))",
            "model.eval()",
        ]
    lines += ["```"]
    if card["blurpool_note"]:
        lines += ["", f"The state dict does not load into torchvision's {card['arch']}: {card['blurpool_note']}."]
    return lines


def _md_preprocessing(pre: dict) -> list[str]:
    return [
        f"- input: {pre['input']}",
        f"- mean {pre['mean']}, std {pre['std']}",
        f"- crop: {pre['crop']}",
        f"- with torchvision: `{pre['torchvision_equivalent']}`",
        f"- test-time augmentation used for the numbers below: {pre['tta']}",
    ]


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f} %"


def _md_validation(val: dict | None) -> list[str]:
    if not val:
        return ["The checkpoint holds no validation record."]
    lines = [
        f"Epoch {val['epoch']} ({val['weights']} weights), {val['samples']} images at {val['resolution']} px"
        f"{', flip TTA' if val['tta'] else ''}: top-1 {_pct(val['top1'])}, top-5 {_pct(val['top5'])}.",
    ]
    if val.get("note"):
        lines += ["", val["note"] + "."]
    return lines


def _md_training(card: dict) -> list[str]:
    tr = card["training"]
    return [
        f"- epochs: {tr['epochs_trained']} of {tr['epochs_planned']}",
        f"- hardware: {card['hardware'] or 'not found'}",
        f"- wall time: {_duration(card['wall_time_s'])} ({card['wall_time_note']})",
        _md_data(card["data"]),
        "",
        "The resolved training config:",
        "",
        "```json",
        json.dumps(tr["config"], indent=1),
        "```",
    ]


def _md_data(data: dict) -> str:
    """The data line: the folder, each split's manifest fingerprint where the folder has a manifest, and why not."""
    line = f"- data: `{data['data_dir']}`"
    if data["manifest"]:
        splits = data["manifest"]["splits"].items()
        line += "; manifest fingerprints " + ", ".join(f"{s} {v['index']} ({v['samples']} images)" for s, v in splits)
    if data.get("note"):
        line += f" ({data['note']})"
    return line


if __name__ == "__main__":
    sys.exit(main())
