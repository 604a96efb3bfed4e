"""The one training config: a typed dataclass, YAML presets and command-line flags built from the same fields.

Precedence, lowest first: the dataclass defaults, then (on `--resume`) the config saved with the run, then the
`--config` preset, then the flags given on the command line (`resolve`, all four layers). Every field is a flag (`max_lr` -> `--max-lr`) and a
YAML key (`max_lr: 0.4`); an unknown YAML key is an error naming the key and the file. This module imports no torch,
so bad flags and a missing data folder fail in well under a second.

Learning rate and batch size: `max_lr` is the peak LR for the *global* batch `batch_size x GPUs x grad_accum`.
When you change the number of GPUs, scale it linearly (Goyal et al. 2017), e.g. ffcv-imagenet's ResNet-50 recipe
uses 1.7 at 8 x 512 = 4096, i.e. 0.106 per 256 images; on one GPU with batch 256 that is 0.106. Setting
`lr_ref_batch` does this for you: the LR actually used is `max_lr * global_batch / lr_ref_batch`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from training.layout import RunPaths

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
LOADERS = ("auto", "ffcv", "dali", "torchvision")
DEVICES = ("auto", "cuda", "cpu")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
SCHEDULES = ("onecycle", "triangular", "cosine", "step")
AUTO_AUGMENT = ("none", "autoaugment", "trivialaugment")
MAX_RES = 1024  # px: far above ImageNet's images, far below a batch that cannot be allocated
RESUME = ("no", "yes", "auto")
LOADER_ORDERS = ("random", "quasi_random")
STEPS = ("auto", "eager", "compile", "graphs")
# one folder name under logs/, runs/ and checkpoints/: no separators or "..", so a run cannot write outside them
RUN_NAME = re.compile(r"[A-Za-z0-9_+=@][A-Za-z0-9._+=@-]{0,199}")
SGD_IMPLS = ("auto", "fused", "foreach")


class ConfigError(ValueError):
    """A bad key, value or file; the message names it and says what would be accepted."""


def option(
    default: Any,
    help: str,
    choices: tuple[str, ...] | None = None,
    flag: str | None = None,
    const: str | None = None,
    **kw: Any,
) -> Any:
    """A dataclass field whose metadata also drives the command line. `const`: the value of the bare flag, for a
    string option whose argument may be left out (`--resume` = `--resume yes`)."""
    meta = {"help": help, "choices": choices, "flag": flag, "const": const}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass(frozen=True)
class TrainConfig:
    # --- data ---
    data_dir: str = option("", "folder with train.beton/val.beton (ffcv) or train/ and val/ class folders")
    loader: str = option(
        "auto",
        "data loader backend (auto: an all-JPEG beton + DALI + GPU -> dali; other betons -> ffcv; "
        "image folders: DALI + GPU -> dali, else torchvision)",
        LOADERS,
    )
    workers: int = option(
        -1,
        "loader worker threads/processes per GPU; -1: this GPU's share of the cores minus one, left "
        "to the training process",
    )
    batch_size: int = option(256, "images per GPU per step (global batch = batch_size x GPUs x grad_accum)")
    val_batch_size: int = option(0, "validation batch per GPU (0: same as --batch-size)")
    num_classes: int = option(0, "expected number of classes; 0 takes it from the dataset, else a mismatch is an error")
    os_cache: bool = option(
        True,
        "ffcv: map the betons and let the OS page cache hold them (best when they fit in RAM); "
        "--no-os-cache: FFCV's process cache, for betons bigger than RAM (with --loader-order "
        "quasi_random)",
    )
    loader_order: str = option(
        "random",
        "ffcv train order: random, or quasi_random (shuffles pages, then samples within "
        "a window of them: far fewer pages read at a time; less random batches)",
        LOADER_ORDERS,
    )
    hw_decoder_load: float = option(
        -1.0,
        "dali: share of the JPEGs sent to the A100/H100/H200 hardware JPEG decoder; -1: "
        "the GPU's default (0.99 on H100/H200, NVIDIA's MLPerf setting; DALI's 0.65 "
        "elsewhere)",
    )
    dali_threads: int = option(
        0, "dali: CPU threads of each DALI pipeline; 0: 6 on H100/H200 (NVIDIA's MLPerf setting), else --workers"
    )
    dali_prefetch: int = option(
        0, "dali: batches each DALI pipeline prepares ahead; 0: 5 on H100/H200 (NVIDIA's MLPerf setting), else DALI's 2"
    )
    dali_feed_thread: bool = option(
        False,
        "dali: drive the pipeline from a thread of the loader's own, so its callback and byte copies leave the "
        "training thread (off until measured on a GPU; see README)",
    )
    nvjpeg_padding_mb: int = option(
        -1,
        "dali: nvJPEG device and host buffer padding in MiB, so it never reallocates; -1: "
        "256 on H100/H200 (NVIDIA's MLPerf setting), else DALI's 16 device / 8 host",
    )
    skip_listed_in: str = option(
        "",
        "dali/torchvision: a convert_report.json; the files it lists as skipped "
        "(undecodable) are left out, so DALI does not stop on them",
    )
    # --- resolution: fixed --res, or progressive min_res -> max_res between start_ramp and end_ramp ---
    res: int = option(224, "training resolution when no progressive schedule is set")
    val_res: int = option(224, "validation resolution (centre crop of ratio 224/256, then resized to this)")
    min_res: int = option(0, "progressive resizing: resolution up to --start-ramp (0: off, use --res)")
    max_res: int = option(0, "progressive resizing: resolution from --end-ramp on")
    start_ramp: int = option(0, "progressive resizing: last epoch (0-based) at --min-res")
    end_ramp: int = option(0, "progressive resizing: first epoch at --max-res")
    res_step: int = option(32, "progressive resizing: resolutions in between are rounded to multiples of this")
    # --- model ---
    arch: str = option("resnet50", "torchvision ResNet (weights=None)", ARCHS)
    zero_init_residual: bool = option(False, "zero-init the last BN of each residual block")
    blurpool: bool = option(False, "3x3 binomial blur before every strided conv with >= 16 input channels")
    channels_last: bool = option(True, "channels_last memory format for model and inputs")
    step: str = option(
        "auto",
        "the train step: eager; compile (torch.compile, once per resolution; checkpoints hold the "
        "plain module); graphs (compile, then forward, backward and SGD update captured as one CUDA "
        "graph per resolution: one GPU, bf16/fp32, no --grad-accum); auto: compile on a GPU, eager on "
        "the CPU and with --deterministic. --compile = --step compile, --no-compile = --step eager",
        STEPS,
    )
    sgd: str = option(
        "auto",
        "SGD kernels: fused (one kernel; with fp16's GradScaler no host sync per step), foreach; "
        "auto: fused on a GPU, torch's default on the CPU",
        SGD_IMPLS,
    )
    # --- optimisation ---
    epochs: int = option(16, "epochs to train")
    max_lr: float = option(0.5, "peak learning rate of every schedule, for the global batch (see lr_ref_batch)")
    lr_ref_batch: int = option(0, "if > 0, scale max_lr linearly by global_batch / lr_ref_batch")
    lr_schedule: str = option("onecycle", "per-step LR schedule", SCHEDULES)
    pct_start: float = option(0.3, "onecycle: share of steps spent increasing the LR")
    div_factor: float = option(25.0, "onecycle: initial LR = max_lr / div_factor (also cosine/step warm-up start)")
    final_div_factor: float = option(1e4, "onecycle: final LR = initial LR / final_div_factor")
    cycle_momentum: bool = option(True, "onecycle: cycle momentum inversely to the LR (torch's OneCycleLR default)")
    base_momentum: float = option(0.85, "onecycle: momentum at the LR peak")
    max_momentum: float = option(0.95, "onecycle: momentum at the start and end")
    lr_peak_epoch: float = option(2.0, "triangular: epoch where the linear warm-up peaks (then linear decay to 0)")
    warmup_epochs: float = option(0.0, "cosine/step: linear warm-up epochs from max_lr/div_factor")
    step_epochs: list[int] = option([30, 60, 80], "step: epochs at which the LR is multiplied by --step-gamma")
    step_gamma: float = option(0.1, "step: LR factor at each of --step-epochs")
    momentum: float = option(0.9, "SGD momentum (ignored for onecycle with cycle_momentum)")
    nesterov: bool = option(False, "Nesterov momentum")
    weight_decay: float = option(5e-5, "L2 weight decay; never on BatchNorm parameters or biases")
    label_smoothing: float = option(0.1, "label smoothing of the training loss")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    precision: str = option(
        "auto", "auto: bf16 where the GPU has it, fp16 + GradScaler on T4/V100, fp32 on CPU", PRECISIONS
    )
    # --- regularisation on the batch (pipeline.augment) and EMA ---
    mixup: float = option(0.0, "mixup alpha (0: off)")
    cutmix: float = option(0.0, "cutmix alpha (0: off)")
    mix_prob: float = option(1.0, "probability of applying mixup/cutmix to a batch")
    mix_switch_prob: float = option(0.5, "with both on, probability of cutmix instead of mixup for a batch")
    random_erase: float = option(0.0, "random erasing probability per image (0: off)")
    auto_augment: str = option(
        "none",
        "per-sample policy on the device: autoaugment (AutoAugment's ImageNet policy, the "
        "reference README's) or trivialaugment (TrivialAugmentWide)",
        AUTO_AUGMENT,
    )
    ema: bool = option(False, "keep an exponential moving average of the weights, evaluated each epoch")
    ema_decay: float = option(0.9998, "EMA decay per optimizer step")
    # --- evaluation ---
    tta: bool = option(False, "validation adds the logits of the horizontally flipped image")
    # --- run, logs, checkpoints ---
    run_name: str = option("", "name of the run's folders under logs/, runs/ and checkpoints/ (default: arch-time)")
    output_dir: str = option(".", "root of logs/, runs/ and checkpoints/")
    resume: str = option(
        "no",
        "continue run --run-name from checkpoints/<run>/checkpoint.pt; 'auto': if that file exists, "
        "else start the run (for restarts under torchrun --max-restarts or a job scheduler)",
        RESUME,
        const="yes",
    )
    checkpoint_every: int = option(
        0,
        "also write checkpoint.pt every this many optimizer steps inside an epoch, with the "
        "loader position, so a kill costs at most that many steps (0: at epoch ends only)",
    )
    checkpoint_minutes: float = option(
        0.0, "also write checkpoint.pt when this many minutes passed since the last one (rank 0's clock; 0: off)"
    )
    deterministic: bool = option(
        False,
        "deterministic kernels, no cuDNN autotuning: a killed and resumed run ends "
        "bit-identical to an uninterrupted one on the CPU (GPUs: see README)",
    )
    keep_last: int = option(0, "keep only the last K per-epoch model_XXX.pt files (0: keep all)")
    stop_after_epoch: int = option(-1, "stop cleanly after this epoch (0-based) ends, checkpoint written (-1: off)")
    log_every: int = option(50, "optimizer steps between TensorBoard points and progress-bar updates")
    progress: bool = option(True, "tqdm progress bar per epoch")
    device: str = option("auto", "auto: cuda if available, else cpu", DEVICES)
    seed: int = option(0, "seed of data order, augmentation and init")

    # ---- derived values ----
    @property
    def progressive(self) -> bool:
        return self.min_res > 0 and self.max_res > 0

    def validate(self) -> list[str]:
        """Every problem with the values, as short sentences naming the flag (empty list: fine). Non-finite numbers
        are refused first, and alone: NaN passes every `x <= 0` test, and its range messages would say nothing more."""
        not_finite = [
            f"--{flag_name(f.name)} must be a finite number (got {getattr(self, f.name)})"
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), float) and not math.isfinite(getattr(self, f.name))
        ]
        if not_finite:
            return not_finite
        return self._value_problems() + self._optimisation_problems() + self._combination_problems()

    def _value_problems(self) -> list[str]:
        """Each value on its own: choices, counts, sizes, the loaders' knobs."""
        problems = []
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                problems.append(f"--{flag_name(f.name)} must be one of {', '.join(choices)} (got {value!r})")
        positive = ["workers", "batch_size", "epochs", "grad_accum", "log_every", "res", "val_res", "res_step"]
        problems += [f"--{flag_name(n)} must be >= 1" for n in positive if getattr(self, n) < 1 and n != "workers"]
        if self.workers < -1:
            problems.append("--workers must be >= 0, or -1 (auto)")
        for n in ("res", "val_res", "min_res", "max_res"):
            if getattr(self, n) > MAX_RES:
                problems.append(
                    f"--{flag_name(n)} {getattr(self, n)}: at most {MAX_RES} px (a batch of 256 at 10,000 px would "
                    "be a 77 GB uint8 tensor; ImageNet's images are about 400 x 350)"
                )
        for n in (
            "val_batch_size",
            "num_classes",
            "keep_last",
            "lr_ref_batch",
            "checkpoint_every",
            "checkpoint_minutes",
        ):
            if getattr(self, n) < 0:
                problems.append(f"--{flag_name(n)} must be >= 0")
        if not (0 <= self.hw_decoder_load <= 1 or self.hw_decoder_load == -1):
            problems.append("--hw-decoder-load must be in [0, 1], or -1 for the GPU's default")
        for n in ("dali_threads", "dali_prefetch"):
            if getattr(self, n) < 0:
                problems.append(f"--{flag_name(n)} must be >= 0 (0: the GPU's default)")
        if self.nvjpeg_padding_mb < -1:
            problems.append("--nvjpeg-padding-mb must be >= 0, or -1 for the GPU's default")
        return problems

    def _optimisation_problems(self) -> list[str]:
        """The schedule's, the optimizer's and the augmentations' numbers, each in its range."""
        problems = []
        if self.max_lr <= 0:
            problems.append("--max-lr must be > 0")
        if not 0 < self.pct_start < 1:
            problems.append("--pct-start must be in (0, 1)")
        if self.div_factor <= 0 or self.final_div_factor <= 0:
            problems.append("--div-factor and --final-div-factor must be > 0")
        if not 0 <= self.label_smoothing < 1:
            problems.append("--label-smoothing must be in [0, 1)")
        if self.weight_decay < 0:
            problems.append("--weight-decay must be >= 0")
        for n in ("momentum", "base_momentum", "max_momentum"):
            if not 0 <= getattr(self, n) < 1:
                problems.append(f"--{flag_name(n)} must be in [0, 1)")
        if self.base_momentum > self.max_momentum:
            problems.append("--base-momentum must be <= --max-momentum (OneCycle cycles between them)")
        if not 0 < self.ema_decay < 1:
            problems.append("--ema-decay must be in (0, 1)")
        for n in ("mix_prob", "mix_switch_prob", "random_erase"):
            if not 0 <= getattr(self, n) <= 1:
                problems.append(f"--{flag_name(n)} must be in [0, 1]")
        if self.mixup < 0 or self.cutmix < 0:
            problems.append("--mixup and --cutmix are Beta alphas and must be >= 0")
        return problems

    def _combination_problems(self) -> list[str]:
        """Values that must fit each other: the resolution ramp, the schedule's epochs, the run to resume."""
        problems = []
        if (self.min_res > 0) != (self.max_res > 0):
            problems.append("progressive resizing needs both --min-res and --max-res (or neither)")
        if self.progressive:
            if self.min_res > self.max_res:
                problems.append("--min-res must be <= --max-res")
            if not 0 <= self.start_ramp <= self.end_ramp:
                problems.append("progressive resizing needs 0 <= --start-ramp <= --end-ramp")
        if self.lr_schedule == "triangular" and not 0 < self.lr_peak_epoch < self.epochs:
            problems.append("--lr-peak-epoch must be inside (0, --epochs)")
        if self.lr_schedule in ("cosine", "step") and not 0 <= self.warmup_epochs < self.epochs:
            problems.append("--warmup-epochs must be in [0, --epochs)")
        if self.lr_schedule == "step" and sorted(self.step_epochs) != list(self.step_epochs):
            problems.append("--step-epochs must be increasing")
        if self.run_name and run_name_problem(self.run_name):
            problems.append(run_name_problem(self.run_name))
        if self.resume != "no" and not self.run_name:
            problems.append(f"--resume {self.resume} needs --run-name (the run to continue)")
        if self.step == "graphs" and self.grad_accum > 1:
            problems.append("--step graphs captures one batch per optimizer step; use --step compile with --grad-accum")
        if self.stop_after_epoch >= self.epochs:
            problems.append("--stop-after-epoch must be < --epochs (epochs are counted from 0)")
        return problems


def run_name_problem(name: str) -> str | None:
    """Why `name` cannot be a run name (it names folders under --output-dir), or None."""
    if RUN_NAME.fullmatch(name):
        return None
    return (
        f"--run-name must be a plain folder name (letters, digits and . _ - + = @, not starting with . or -), got "
        f"{name!r}: it names the run's folders under --output-dir"
    )


# ---------------------------------------------------------------------------------------------- fields and types


def flag_name(name: str) -> str:
    return name.replace("_", "-")


@functools.cache
def field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _coerce(name: str, value: Any, where: str) -> Any:
    """Check a YAML/saved value against the field's type; ints are accepted for floats."""
    kind = field_types()[name]
    if isinstance(kind, types.GenericAlias) and kind.__origin__ is list:
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{where}: {name} must be a list of integers (got {value!r})")
        return list(value)
    if name == "resume" and isinstance(value, bool):
        return "yes" if value else "no"  # config.yaml files written when --resume was a plain switch
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {name} must be true or false (got {value!r})")
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is str and isinstance(value, str):
        return value
    raise ConfigError(f"{where}: {name} must be {kind.__name__} (got {value!r})")


def apply_overrides(cfg: TrainConfig, values: dict[str, Any], where: str) -> TrainConfig:
    """Return cfg with `values` applied; unknown keys and wrong types raise ConfigError naming `where`."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    updates = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name == "compile":  # presets and saved runs from before --step
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: compile must be true or false (or use step: {', '.join(STEPS)})")
            name, value = "step", "compile" if value else "eager"
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint}")
        updates[name] = _coerce(name, value, where)
    return dataclasses.replace(cfg, **updates)


def preset_path(name_or_path: str) -> Path:
    """`--config` accepts a file path or a preset name from configs/ (with or without .yaml)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    if p.is_dir():
        raise ConfigError(f"--config {name_or_path}: a folder; give a YAML file in it, or a preset name")
    for candidate in (CONFIGS_DIR / name_or_path, CONFIGS_DIR / f"{name_or_path}.yaml"):
        if candidate.is_file():
            return candidate
    names = ", ".join(sorted(q.stem for q in CONFIGS_DIR.glob("*.yaml"))) or "none"
    raise ConfigError(
        f"--config {name_or_path}: no such file, and no preset of that name in {CONFIGS_DIR} (presets: {names})"
    )


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(values: dict[str, Any], where: str = "saved config") -> TrainConfig:
    return apply_overrides(TrainConfig(), values, where)


def dump_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ---------------------------------------------------------------------------------------------- command line


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error: the usage block of ~60 flags would bury the line that matters."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_config_flags(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per field. Defaults are SUPPRESSed so the namespace holds only what the user typed."""
    p.add_argument("--config", default=None, help="YAML preset: a path or a name from configs/ (flags override it)")
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        kind = field_types()[f.name]
        meta = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f"{meta['help']} (default: {default})"
        flag = f"--{flag_name(f.name)}"
        common = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif meta.get("const") is not None:
            p.add_argument(flag, nargs="?", const=meta["const"], choices=meta.get("choices"), **common)
        elif isinstance(kind, types.GenericAlias):
            p.add_argument(flag, type=int, nargs="+", metavar="N", **common)
        else:
            p.add_argument(
                flag,
                type=kind,
                choices=meta.get("choices"),
                metavar=None if meta.get("choices") else f.name.upper(),
                **common,
            )
    if "step" not in skip:  # the flag names from before --step
        p.add_argument(
            "--compile",
            dest="step",
            action="store_const",
            const="compile",
            default=argparse.SUPPRESS,
            help="= --step compile",
        )
        p.add_argument(
            "--no-compile",
            dest="step",
            action="store_const",
            const="eager",
            default=argparse.SUPPRESS,
            help="= --step eager",
        )


def resumed_config(args: argparse.Namespace) -> TrainConfig | None:
    """The config saved with the run that --resume continues (checkpoints/<run>/config.yaml), or None: no --resume,
    or --resume auto before the run's first checkpoint. --resume auto continues the run when its checkpoint.pt
    exists and starts it otherwise, so the same command line serves the first launch and every restart (torchrun
    --max-restarts, a spot job re-queued). Commands without --resume (lr-find, show-batch) get None."""
    mode = getattr(args, "resume", "no")
    if mode == "no":
        return None
    if not getattr(args, "run_name", ""):
        raise ConfigError(f"--resume {mode} needs --run-name (the run to continue)")
    if run_name_problem(args.run_name):
        raise ConfigError(run_name_problem(args.run_name))
    paths = RunPaths(getattr(args, "output_dir", "."), args.run_name)
    saved, latest = paths.config, paths.latest
    if mode == "auto" and not latest.is_file():
        return None
    if not saved.is_file():
        raise ConfigError(
            f"--resume: {saved} not found; is --output-dir the one the run used? (runs there: "
            f"{', '.join(sorted(p.name for p in saved.parents[1].glob('*'))) or 'none'})"
        )
    if not latest.is_file():
        raise ConfigError(
            f"--resume: {latest} not found: run {args.run_name!r} stopped before its first "
            "checkpoint; start it again with --resume auto (or without --resume)"
        )
    return from_dict(load_yaml(saved), str(saved))


def resolve(args: argparse.Namespace) -> TrainConfig:
    """defaults < the saved config of a run to resume (`resumed_config`) < --config preset < flags typed on the
    command line."""
    cfg = resumed_config(args) or TrainConfig()
    if getattr(args, "config", None):
        path = preset_path(args.config)
        cfg = apply_overrides(cfg, load_yaml(path), str(path))
    typed = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}
    return dataclasses.replace(cfg, **typed)
