"""Config: YAML presets + flags, strict keys, and the checks that fail in well under a second (before torch)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from _beton_helpers import index_only_beton

from training.config import CONFIGS_DIR, ConfigError, TrainConfig, apply_overrides, from_dict, load_yaml, preset_path
from training.train import build_parser, resolve_config

REPO = Path(__file__).resolve().parents[1]


def folders(root: Path, train: list[str], val: list[str]) -> Path:
    for split, wnids in (("train", train), ("val", val)):
        for w in wnids:
            (root / split / w).mkdir(parents=True)
    return root


def parse(*flags: str):
    return resolve_config(build_parser().parse_args(list(flags)))


def test_presets_load_and_validate():
    names = sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))
    assert {
        "demo",
        "t4_budget",
        "imagenet100_quick",
        "reference_onecycle_120ep",
        "rn50_8xa100_16ep",
        "rn50_8xa100_88ep",
    } <= set(names)
    for name in names:
        cfg = apply_overrides(TrainConfig(), load_yaml(preset_path(name)), name)
        assert cfg.validate() == [], name


def test_ffcv_presets_reproduce_their_recipe():
    ramps = {16: (11, 13), 24: (17, 20), 32: (23, 27), 40: (29, 34), 56: (41, 48), 88: (65, 76)}
    for epochs, (start, end) in ramps.items():
        cfg = from_dict(load_yaml(preset_path(f"rn50_8xa100_{epochs}ep")))
        assert (cfg.epochs, cfg.start_ramp, cfg.end_ramp, cfg.min_res, cfg.max_res) == (epochs, start, end, 160, 192)
        assert cfg.batch_size * 8 == cfg.lr_ref_batch == 4096 and cfg.max_lr == 1.7
        assert cfg.lr_schedule == "triangular" and cfg.blurpool and cfg.val_res == 256 and cfg.tta
    t4 = from_dict(load_yaml(preset_path("t4_budget")))
    assert t4.precision == "fp16" and (t4.min_res, t4.max_res) == (160, 192)
    from training.schedules import effective_max_lr

    assert effective_max_lr(t4, world_size=1) == pytest.approx(1.7 * 256 / 4096)


def test_flags_override_preset_and_preset_overrides_defaults(tmp_path):
    data = folders(tmp_path / "d", ["n1", "n2"], ["n1", "n2"])
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump({"epochs": 7, "max_lr": 0.3, "blurpool": True, "step_epochs": [2, 4]}))
    cfg = parse("--config", str(preset), "--data-dir", str(data), "--max-lr", "0.9", "--no-blurpool")
    assert (cfg.epochs, cfg.max_lr, cfg.blurpool, cfg.step_epochs) == (7, 0.9, False, [2, 4])
    assert cfg.batch_size == TrainConfig().batch_size


def test_unknown_and_mistyped_keys_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 3\nmax_lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'max_lrr' \(did you mean 'max_lr'\?\)"):
        apply_overrides(TrainConfig(), load_yaml(bad), str(bad))
    with pytest.raises(ConfigError, match="epochs must be int"):
        apply_overrides(TrainConfig(), {"epochs": "ten"}, "x.yaml")
    with pytest.raises(ConfigError, match="tta must be true or false"):
        apply_overrides(TrainConfig(), {"tta": 1}, "x.yaml")
    assert apply_overrides(TrainConfig(), {"max_lr": 1}, "x.yaml").max_lr == 1.0  # ints are fine for floats
    with pytest.raises(ConfigError, match="no such file, and no preset"):
        preset_path("no_such_preset")


def test_value_checks():
    problems = TrainConfig(
        epochs=0, min_res=160, max_lr=-1, stop_after_epoch=99, lr_schedule="triangular", lr_peak_epoch=5
    ).validate()
    text = " ".join(problems)
    for flag in ("--epochs", "--min-res", "--max-lr", "--stop-after-epoch", "--lr-peak-epoch"):
        assert flag in text
    assert TrainConfig().validate() == []


def test_data_checks(tmp_path):
    data = folders(tmp_path / "d", ["n1", "n2", "n3"], ["n1", "n2", "n3"])
    assert parse("--data-dir", str(data)).data_dir == str(data)
    with pytest.raises(ValueError, match="has 3 classes but the config expects --num-classes 1000"):
        parse("--data-dir", str(data), "--num-classes", "1000")
    with pytest.raises(ValueError, match="no such folder"):
        parse("--data-dir", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="--data-dir is required"):
        parse()
    odd = folders(tmp_path / "odd", ["n1"], ["n1", "n9"])
    with pytest.raises(ValueError, match=r"classes \['n9'\] are not in train/"):
        parse("--data-dir", str(odd))
    betons = tmp_path / "b"
    betons.mkdir()
    with pytest.raises(ValueError, match="--loader ffcv needs train.beton and val.beton"):
        parse("--data-dir", str(betons), "--loader", "ffcv")
    (betons / "train.beton").touch()
    (betons / "val.beton").touch()
    (betons / "classes.json").write_text(json.dumps(["a", "b"]))
    with pytest.raises(ValueError, match=r"train.beton: 0 bytes, too short"):  # damaged betons: found before torch
        parse("--data-dir", str(betons), "--loader", "ffcv")
    index_only_beton(betons / "train.beton", [0, 1, 1, 0])
    index_only_beton(betons / "val.beton", [1, 0])
    assert parse("--data-dir", str(betons), "--loader", "ffcv", "--num-classes", "2").num_classes == 2
    with pytest.raises(ValueError, match="--resume: .*config.yaml not found"):
        parse("--data-dir", str(data), "--run-name", "nope", "--resume", "--output-dir", str(tmp_path))


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--precision", "fp8"], "invalid choice: 'fp8'"),
        (["--data-dir", "/nonexistent/rn50"], "no such folder"),
        (["--data-dir", "{data}", "--num-classes", "1000"], "has 2 classes"),
        (["--data-dir", "{data}", "--min-res", "160"], "needs both --min-res and --max-res"),
        (["--run-name", "x", "--resume", "--output-dir", "{data}"], "config.yaml not found"),
        (["--data-dir", "{data}", "--run-name", "../../escaped"], "--run-name must be a plain folder name"),
        (["--data-dir", "{data}", "--run-name", "/tmp/abs"], "--run-name must be a plain folder name"),
        (["--run-name", "../x", "--resume", "--output-dir", "{data}"], "--run-name must be a plain folder name"),
        (["--data-dir", "{data}", "--step", "graphs", "--grad-accum", "2"], "--step graphs captures one batch"),
    ],
)
def test_bad_input_fails_before_torch_is_imported(tmp_path, flags, message):
    """One clear line on stderr, exit code 2, and torch never imported (that is what keeps it under a second)."""
    data = folders(tmp_path / "d", ["n1", "n2"], ["n1", "n2"])
    flags = [f.replace("{data}", str(data)) for f in flags]
    probe = (
        "import sys\nfrom training.train import main\ntry:\n    rc = main(sys.argv[1:])\nexcept SystemExit as e:\n"
        "    rc = e.code\nprint('TORCH_IMPORTED' if 'torch' in sys.modules else 'NO_TORCH', rc)\n"
    )
    r = subprocess.run([sys.executable, "-c", probe, *flags], capture_output=True, text=True, cwd=REPO)
    assert r.stdout.split() == ["NO_TORCH", "2"], (r.stdout, r.stderr)
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and message in errors[0], r.stderr


def test_help_lists_the_reference_flags():
    r = subprocess.run([sys.executable, "-m", "training", "--help"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0
    for flag in (
        "--data-dir",
        "--batch-size",
        "--workers",
        "--epochs",
        "--max-lr",
        "--pct-start",
        "--div-factor",
        "--final-div-factor",
        "--label-smoothing",
        "--run-name",
        "--resume",
        "--config",
        "--output-dir",
        "--device",
        "--loader",
        "--arch",
        "--res",
        "--val-res",
        "--precision",
        "--compile",
        "--grad-accum",
        "--ema",
        "--mixup",
        "--cutmix",
        "--random-erase",
        "--auto-augment",
        "--blurpool",
        "--tta",
        "--lr-schedule",
        "--weight-decay",
        "--seed",
        "--min-res",
        "--max-res",
    ):
        assert flag in r.stdout, flag


def test_loader_options_are_flags_and_are_checked(tmp_path):
    data = folders(tmp_path / "d", ["n1", "n2"], ["n1", "n2"])
    report = tmp_path / "convert_report.json"
    report.write_text("{}")
    cfg = parse(
        "--data-dir",
        str(data),
        "--no-os-cache",
        "--loader-order",
        "quasi_random",
        "--hw-decoder-load",
        "0.3",
        "--dali-threads",
        "4",
        "--dali-prefetch",
        "3",
        "--nvjpeg-padding-mb",
        "64",
        "--skip-listed-in",
        str(report),
    )
    from pipeline import DALIOptions, FFCVOptions, LoaderOptions
    from training.components import loader_options

    assert loader_options(cfg) == LoaderOptions(
        backend="auto",
        workers=-1,
        ffcv=FFCVOptions(os_cache=False, order="quasi_random"),
        dali=DALIOptions(hw_decoder_load=0.3, threads=4, prefetch=3, nvjpeg_padding_mb=64),
        skip_listed_in=str(report),
    )
    assert loader_options(parse("--data-dir", str(data))) == LoaderOptions(
        dali=DALIOptions(hw_decoder_load=-1.0, threads=0, prefetch=0, nvjpeg_padding_mb=-1)
    )  # -1 and 0: the GPU kind's defaults (pipeline.dali_tuning)
    with pytest.raises(ValueError, match="--skip-listed-in .*missing.json: no such file"):
        parse("--data-dir", str(data), "--skip-listed-in", str(tmp_path / "missing.json"))
    assert (
        "--hw-decoder-load must be in [0, 1], or -1 for the GPU's default"
        in TrainConfig(hw_decoder_load=1.5).validate()
    )
    assert len(TrainConfig(dali_threads=-1, dali_prefetch=-2, nvjpeg_padding_mb=-2).validate()) == 3
    with pytest.raises(SystemExit):
        parse("--data-dir", str(data), "--loader-order", "sequential")


def test_betons_bigger_than_ram_get_one_line_of_advice(tmp_path):
    from training.preflight import page_cache_advice

    betons = tmp_path / "b"
    betons.mkdir()
    for split, size in (("train", 3000), ("val", 1000)):
        with open(betons / f"{split}.beton", "wb") as f:
            f.truncate(size)  # sparse: a size without the bytes
    cfg = TrainConfig(data_dir=str(betons))
    advice = page_cache_advice(cfg, ram_bytes=4000)
    assert advice and "--no-os-cache --loader-order quasi_random" in advice and str(betons) in advice
    assert page_cache_advice(cfg, ram_bytes=5000) is None  # 4000 bytes fit in 80% of 5000
    assert page_cache_advice(TrainConfig(data_dir=str(betons), os_cache=False), ram_bytes=4000) is None
    dali = page_cache_advice(TrainConfig(data_dir=str(betons), loader="dali"), ram_bytes=4000)
    assert "DALI reads the mapped file" in dali and "--compress-prob 1" in dali and "--no-os-cache" not in dali
    assert page_cache_advice(TrainConfig(data_dir=str(betons), loader="torchvision"), ram_bytes=4000) is None
    assert page_cache_advice(TrainConfig(data_dir=str(tmp_path)), ram_bytes=1) is None  # no betons there


def test_step_flags_and_the_compile_key_from_before_them(tmp_path):
    """--step picks the train step; --compile/--no-compile and `compile: true/false` in presets and saved configs
    (written before --step existed) still mean what they meant."""
    data = folders(tmp_path / "d", ["n1", "n2"], ["n1", "n2"])
    assert parse("--data-dir", str(data)).step == "auto"
    assert parse("--data-dir", str(data), "--step", "graphs").step == "graphs"
    assert parse("--data-dir", str(data), "--compile").step == "compile"
    assert parse("--data-dir", str(data), "--no-compile").step == "eager"
    assert from_dict({"compile": True}).step == "compile" and from_dict({"compile": False}).step == "eager"
    preset = tmp_path / "p.yaml"
    preset.write_text("compile: true\nsgd: foreach\n")
    cfg = parse("--data-dir", str(data), "--config", str(preset))
    assert (cfg.step, cfg.sgd) == ("compile", "foreach")
    with pytest.raises(ConfigError, match="compile must be"):
        from_dict({"compile": "yes"})


def test_the_config_is_final_once_resolved(tmp_path):
    """num_classes comes from the data before the run starts, and nothing changes the config afterwards."""
    import dataclasses

    data = folders(tmp_path / "d", ["n1", "n2", "n3"], ["n1", "n2", "n3"])
    cfg = parse("--data-dir", str(data), "--run-name", "ok-run_1.2")
    assert cfg.num_classes == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.run_name = "other"


def test_unreadable_class_folder_is_found_before_torch(tmp_path, monkeypatch):
    """chmod 000 does not stop root (the tests' user): access() is made to say no for one class folder."""
    import os

    import training.preflight as preflight

    data = folders(tmp_path / "d", ["n1", "n2"], ["n1", "n2"])
    real = os.access
    monkeypatch.setattr(preflight.os, "access", lambda p, mode: False if str(p).endswith("val/n2") else real(p, mode))
    with pytest.raises(ValueError, match=r"val/n2: cannot be read \(permissions\)"):
        parse("--data-dir", str(data))


def test_a_damaged_skip_report_is_found_before_torch(tmp_path):
    data = folders(tmp_path / "d", ["n1", "n2"], ["n1", "n2"])
    (tmp_path / "report.json").write_text("garbage")
    with pytest.raises(ValueError, match=r"--skip-listed-in .*report.json: not a convert_report.json"):
        parse("--data-dir", str(data), "--skip-listed-in", str(tmp_path / "report.json"))
