"""rn50 convert: round trips through real odd files, skipping with reasons, subsets, atomicity, input errors."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import decode_beton, requires_ffcv
from PIL import Image

pytestmark = requires_ffcv

REPO = Path(__file__).resolve().parents[1]


def scene(label: int, w: int, h: int, seed: int) -> np.ndarray:
    """Smooth content (JPEG-friendly, resize-stable) whose mean colour says the label."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.array([[200, 60, 60], [60, 200, 60], [60, 60, 200]][label], dtype=np.float32)
    ramp = (
        30 * np.sin(xx / w * np.pi * rng.uniform(1, 3))[..., None]
        + 30 * np.cos(yy / h * np.pi * rng.uniform(1, 3))[..., None]
    )
    return np.clip(base + ramp, 0, 255).astype(np.uint8)


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def build_odd_tree(root: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """An ImageNet-layout folder with every kind of real-world file. Returns
    (expected RGB pixels before resizing, per valid relative path) and (expected reason keyword, per bad path)."""
    classes = ["n00000001", "n00000002", "n00000003"]
    for c in classes:
        (root / "train" / c).mkdir(parents=True)
    valid: dict[str, np.ndarray] = {}
    bad: dict[str, str] = {}

    def put(rel: str, data: bytes, expected: np.ndarray | None = None, reason: str | None = None):
        (root / rel).write_bytes(data)
        if expected is not None:
            valid[rel] = expected
        if reason is not None:
            bad[rel] = reason

    for label, c in enumerate(classes):
        for i in range(3):
            arr = scene(label, 120 + 10 * i, 90 + 7 * i, seed=label * 10 + i)
            put(f"train/{c}/plain_{i}.JPEG", jpeg_bytes(Image.fromarray(arr)), arr)
    c0, c1, c2 = (f"train/{c}" for c in classes)
    arr = scene(0, 100, 80, 1)
    cmyk = Image.fromarray(arr).convert("CMYK")
    put(f"{c0}/cmyk.JPEG", jpeg_bytes(cmyk), np.asarray(cmyk.convert("RGB")))
    gray = Image.fromarray(arr).convert("L")
    put(f"{c0}/gray.JPEG", jpeg_bytes(gray), np.asarray(gray.convert("RGB")))
    pal = Image.fromarray(scene(1, 90, 70, 2)).convert("P", palette=Image.ADAPTIVE, colors=64)
    put(f"{c1}/palette.png", png_bytes(pal), np.asarray(pal.convert("RGB")))
    rgb = scene(1, 80, 60, 3)
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[:, :20] = 0  # left strip transparent: composited over white
    rgba = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    expect = rgb.copy()
    expect[:, :20] = 255
    put(f"{c1}/rgba.png", png_bytes(rgba), expect)
    g8 = scene(2, 64, 48, 4)[..., 0]
    put(f"{c2}/gray16.png", png_bytes(Image.fromarray(g8.astype(np.uint16) * 257)), np.repeat(g8[..., None], 3, 2))
    png_in_jpeg = scene(2, 70, 50, 5)
    put(f"{c2}/png_content.JPEG", png_bytes(Image.fromarray(png_in_jpeg)), png_in_jpeg)
    big = scene(2, 1400, 1000, 6)  # larger than --max-res: DCT-downscaled then area-resized
    put(f"{c2}/big.JPEG", jpeg_bytes(Image.fromarray(big)), big)
    lower = scene(0, 60, 60, 7)
    put(f"{c0}/lower_ext.jpg", jpeg_bytes(Image.fromarray(lower)), lower)
    # bad files: skipped with a reason
    put(f"{c0}/empty.JPEG", b"", reason="empty")
    full = jpeg_bytes(Image.fromarray(scene(1, 200, 150, 8)))
    put(f"{c1}/truncated.JPEG", full[: len(full) // 2], reason="truncated")
    put(
        f"{c1}/garbage.JPEG",
        bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)),
        reason="not an image",
    )
    put(f"{c2}/text.JPEG", b"<html>404 Not Found</html>", reason="not an image")
    put(f"{c2}/bad_body.JPEG", full[:200] + b"\x00" * 50 + b"\xff\xd9", reason="")  # header ok, data broken
    # ignored: hidden files, resource forks, non-image extensions
    put(f"{c0}/.DS_Store", b"junk")
    put(f"{c0}/._plain_0.JPEG", b"junk")
    put(f"{c1}/notes.txt", b"hello")
    (root / "val").mkdir()
    for label, c in enumerate(classes):
        (root / "val" / c).mkdir()
        arr = scene(label, 100, 100, 100 + label)
        put(f"val/{c}/v.JPEG", jpeg_bytes(Image.fromarray(arr)), arr)
    return valid, bad


def expected_after_resize(arr: np.ndarray, max_side: int) -> np.ndarray:
    """Reference resize independent of the converter's code path: PIL's box filter (area averaging)."""
    h, w = arr.shape[:2]
    if max(h, w) <= max_side:
        return arr
    r = max_side / max(h, w)
    return np.asarray(Image.fromarray(arr).resize((int(r * w), int(r * h)), Image.BOX))


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd")
    valid, bad = build_odd_tree(root)
    out = root / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dataset_tools.convert",
            "--data-dir",
            str(root),
            "--out-dir",
            str(out),
            "--workers",
            "2",
            "--max-res",
            "500",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    return root, out, valid, bad, proc


def test_odd_files_exit_zero_and_report_every_bad_file(odd):
    root, out, valid, bad, proc = odd
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "convert_report.json").read_text())
    skipped = {str(Path(s["path"]).relative_to(root)): s["reason"] for s in report["train"]["skipped"]}
    # bad_body.JPEG has an intact header and a broken body: libjpeg may decode it with a warning or refuse it.
    broken_body = skipped.pop("train/n00000003/bad_body.JPEG", None)
    expected_bad = {k: v for k, v in bad.items() if v}
    assert set(skipped) == set(expected_bad)
    for rel, keyword in expected_bad.items():
        assert keyword in skipped[rel], (rel, skipped[rel])
    n_train_valid = sum(1 for k in valid if k.startswith("train/"))
    assert report["train"]["written"] == n_train_valid + (0 if broken_body else 1)
    assert report["train"]["ignored_non_images"] == 3
    assert report["val"]["written"] == 3 and report["val"]["skipped"] == []
    assert report["train"]["bytes"] == (out / "train.beton").stat().st_size
    assert report["train"]["images_per_s"] > 0 and report["train"]["classes"] == 3
    assert json.loads((out / "classes.json").read_text()) == ["n00000001", "n00000002", "n00000003"]
    assert "skipped" in proc.stdout and "empty file" in proc.stdout


def test_round_trip_pixels_and_labels(odd):
    root, out, valid, bad, proc = odd
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "convert_report.json").read_text())
    skipped = {s["path"] for s in report["train"]["skipped"]}
    for split in ("train", "val"):
        # The beton's order is ImageFolder's (sorted classes, sorted names) minus the skipped files.
        from dataset_tools.files import scan_split

        listing = scan_split(root / split)
        kept = [(p, lab) for p, lab in listing.files if p not in skipped]
        images, labels = decode_beton(out / f"{split}.beton")
        assert len(images) == len(kept)
        assert labels.tolist() == [lab for _, lab in kept]
        for (path, _label), image in zip(kept, images):
            rel = str(Path(path).relative_to(root))
            if rel not in valid:  # bad_body.JPEG when libjpeg decoded it anyway
                continue
            ref = expected_after_resize(valid[rel], 500)
            assert image.shape == ref.shape, rel
            err = np.abs(image.astype(np.int16) - ref.astype(np.int16)).mean()
            assert err < 4.0, (rel, err)  # JPEG q90 of smooth content, plus resampling differences


def test_ffcv_loader_reads_what_was_written(odd):
    """The consumer that matters: FFCV's own Loader, sequential, labels and colours intact."""
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    root, out, valid, bad, proc = odd
    ref_images, ref_labels = decode_beton(out / "train.beton")
    loader = Loader(
        str(out / "train.beton"),
        batch_size=4,
        num_workers=1,
        order=OrderOption.SEQUENTIAL,
        drop_last=False,
        pipelines={"image": [CenterCropRGBImageDecoder((32, 32), ratio=1.0)], "label": [IntDecoder(), ToTensor()]},
    )
    got_labels, got_means = [], []
    for images, labels in loader:
        got_labels += labels.view(-1).tolist()
        got_means += [img.reshape(-1, 3).mean(0) for img in np.asarray(images, dtype=np.float32)]
    assert got_labels == ref_labels.tolist()
    for mean, ref in zip(got_means, ref_images):
        h, w = ref.shape[:2]
        s = min(h, w)
        centre = ref[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s].reshape(-1, 3).mean(0)
        assert np.abs(mean - centre).max() < 12


def test_same_seed_same_storage_modes(tmp_path, coded_root):
    from dataset_tools.beton_format import read_index
    from dataset_tools.convert import ConvertOptions, convert

    modes = []
    for name in ("a", "b"):
        convert(coded_root, tmp_path / name, ["train"], ConvertOptions(workers=2, progress=False, seed=3))
        modes.append(read_index(tmp_path / name / "train.beton").metadata["f0"]["mode"].tolist())
    assert modes[0] == modes[1]
    assert 0 < sum(modes[0]) < len(modes[0])  # both JPEG (0) and raw (1) present at compress_prob 0.5


def test_subsets_are_deterministic(tmp_path, synth_root):
    from dataset_tools.convert import main

    args = [
        "--data-dir",
        str(synth_root),
        "--classes",
        "2",
        "--per-class",
        "5",
        "--val-per-class",
        "2",
        "--workers",
        "2",
        "--no-progress",
    ]
    assert main(args + ["--out-dir", str(tmp_path / "a")]) == 0
    assert main(args + ["--out-dir", str(tmp_path / "b")]) == 0
    for name in ("a", "b"):
        report = json.loads((tmp_path / name / "convert_report.json").read_text())
        assert report["train"]["written"] == 10 and report["val"]["written"] == 4
    assert (tmp_path / "a" / "classes.json").read_text() == (tmp_path / "b" / "classes.json").read_text()
    assert len(json.loads((tmp_path / "a" / "classes.json").read_text())) == 2
    _, la = decode_beton(tmp_path / "a" / "train.beton")
    _, lb = decode_beton(tmp_path / "b" / "train.beton")
    assert la.tolist() == lb.tolist() == [0] * 5 + [1] * 5


@pytest.mark.parametrize(
    "layout, message",
    [
        ("missing", "no such folder"),
        ("no_classes", "no class folders"),
        ("flat_val", "rn50 organize-val"),
        ("empty_split", "no images"),
        ("all_bad", "none of the"),
    ],
)
def test_unusable_input_fails_clearly(tmp_path, capsys, layout, message):
    from dataset_tools.convert import main

    root = tmp_path / "data"
    if layout != "missing":
        (root / "train").mkdir(parents=True)
    splits = "train"
    if layout == "flat_val":
        (root / "train").rmdir()
        (root / "val").mkdir()
        (root / "val" / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"x")
        splits = "val"
    if layout in ("empty_split", "all_bad"):
        (root / "train" / "n00000001").mkdir()
    if layout == "all_bad":
        (root / "train" / "n00000001" / "a.JPEG").write_bytes(b"")
    code = main(
        [
            "--data-dir",
            str(root),
            "--out-dir",
            str(tmp_path / "out"),
            "--splits",
            splits,
            "--no-progress",
            "--workers",
            "1",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "train.beton").exists()


def test_bad_flags(capsys, tmp_path):
    from dataset_tools.convert import main

    assert main(["--data-dir", str(tmp_path), "--out-dir", str(tmp_path), "--jpeg-quality", "0"]) == 2
    assert "--jpeg-quality" in capsys.readouterr().err


def test_killed_conversion_leaves_no_final_file(tmp_path):
    """SIGKILL mid-write: no train.beton appears; the next run cleans up and completes."""
    from dataset_tools.synth import synthesize

    synthesize(tmp_path / "data", num_classes=2, train_per_class=80, val_per_class=1, seed=9, workers=2, progress=False)
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "dataset_tools.convert",
        "--data-dir",
        str(tmp_path / "data"),
        "--out-dir",
        str(out),
        "--workers",
        "1",
        "--splits",
        "train",
        "--no-progress",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    tmp_file = None
    while time.monotonic() < deadline and proc.poll() is None:
        temps = list(out.glob(".train.beton.tmp-*")) if out.exists() else []
        # wait until image data is being written (the file grows past its header/metadata region)
        if temps and temps[0].stat().st_size > 2_000_000:
            tmp_file = temps[0]
            break
        time.sleep(0.05)
    assert tmp_file is not None and proc.poll() is None, "conversion finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.2)
    assert not (out / "train.beton").exists()
    assert tmp_file.exists()  # the partial file keeps its temporary name
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "interrupted conversion" in done.stderr
    assert not list(out.glob(".train.beton.tmp-*"))
    _, labels = decode_beton(out / "train.beton")
    assert len(labels) == 160


def test_real_photo_encodings_round_trip(tmp_path):
    """A real photograph (matplotlib's sample image) in the encodings real downloads use."""
    import cv2
    from matplotlib import cbook

    photo = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    d = tmp_path / "data" / "train" / "n00000001"
    d.mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90": ImageFolder ignores it, so must we (labels and pixels as stored)
    photo.save(d / "a_q75.JPEG", quality=75)
    photo.save(d / "b_progressive.JPEG", quality=92, progressive=True)
    photo.save(d / "c_444.JPEG", quality=95, subsampling=0)
    photo.save(d / "d_exif.JPEG", quality=90, exif=exif)
    photo.convert("CMYK").save(d / "e_cmyk.JPEG", quality=95)
    photo.resize((photo.width * 3, photo.height * 3), Image.BICUBIC).save(d / "f_big.JPEG", quality=90)
    photo.save(d / "g.webp", quality=95)
    photo.save(d / "h.bmp")
    from dataset_tools.convert import ConvertOptions, convert

    report = convert(
        tmp_path / "data", tmp_path / "out", ["train"], ConvertOptions(workers=2, progress=False, compress_prob=0.0)
    )
    assert report["train"]["written"] == 8 and not report["train"]["skipped"]
    images, labels = decode_beton(tmp_path / "out" / "train.beton")
    for path, image in zip(sorted(d.iterdir()), images):
        ref = np.asarray(Image.open(path).convert("RGB"))
        h, w = ref.shape[:2]
        if max(h, w) > 500:
            r = 500 / max(h, w)
            ref = cv2.resize(ref, (int(r * w), int(r * h)), interpolation=cv2.INTER_AREA)
        assert image.shape == ref.shape, path.name
        err = np.abs(image.astype(np.int16) - ref).mean()
        assert err < 2.5, (path.name, err)  # stored raw: only decoder (IDCT, DCT-domain scaling) differences


def test_convert_after_opencv_threads_started_in_parent(tmp_path, coded_root):
    """Regression: a parent that already ran OpenCV on its thread pool (as a test process or a notebook does) used to
    fork writer processes that hung forever on the pool's locks. Run in a subprocess so a hang fails, not blocks."""
    code = f"""
import numpy as np, cv2
a = np.zeros((1500, 1500, 3), np.uint8)
for _ in range(3):
    cv2.resize(a, (600, 600), interpolation=cv2.INTER_AREA)
from dataset_tools.convert import ConvertOptions, convert
report = convert({str(coded_root)!r}, {str(tmp_path / "out")!r}, ["train"], ConvertOptions(workers=2, progress=False))
print(report["train"]["written"])
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("48")


def test_second_conversion_into_a_busy_folder_stops_at_once_and_keeps_the_first_ones_work(tmp_path, coded_root, capsys):
    """A second convert used to remove the running one's temporary beton as 'left by an interrupted conversion'."""
    from dataset_tools.convert import main
    from dataset_tools.locks import folder_lock

    out = tmp_path / "out"
    out.mkdir()
    running = out / ".train.beton.tmp-424242"  # the first conversion's file in the making
    running.write_bytes(b"partial")
    with folder_lock(out, "rn50 convert"):  # ... and its lock
        code = main(["--data-dir", str(coded_root), "--out-dir", str(out), "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and str(out) in err and f"pid {os.getpid()}" in err
    assert running.read_bytes() == b"partial"
    assert not (out / "train.beton").exists() and not (out / "classes.json").exists()


def _coded_pair(tmp_path):
    """Two coded datasets with the same class count but other wnids and image sizes: A (96 x 80), B (64 x 48)."""
    import shutil

    from conftest import make_coded_dataset

    a = make_coded_dataset(tmp_path / "A", classes=3, train_per_class=3, val_per_class=2)
    b = make_coded_dataset(tmp_path / "B", classes=3, train_per_class=3, val_per_class=2, size=(64, 48))
    for split in ("train", "val"):
        for d in sorted((b / split).iterdir()):
            shutil.move(d, d.with_name("n9" + d.name[2:]))  # n00000001 -> n90000001
    return a, b


def _killed_at(k: int, argv: list[str]) -> None:
    """Child process: run rn50 convert and SIGKILL ourselves just before its k-th os.replace (a commit step)."""
    real, calls = os.replace, [0]

    def replace(src, dst):
        calls[0] += 1
        if calls[0] == k:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst)

    os.replace = replace
    try:
        from dataset_tools.convert import main

        os._exit(main(argv))
    except BaseException:
        os._exit(3)


def test_a_reconversion_killed_at_any_commit_step_never_relabels(tmp_path, capsys):
    """Convert used to write classes.json first; killed while re-converting, old betons sat beside new names. Now a
    killed re-run leaves either the old set, the new set, or a folder the loaders refuse -- never a mix."""
    import multiprocessing as mp
    import shutil

    from dataset_tools.beton_format import read_index
    from dataset_tools.convert import main
    from pipeline.folders import beton_classes
    from training.preflight import DataError, dataset_classes

    a, b = _coded_pair(tmp_path)
    classes_a = sorted(p.name for p in (a / "train").iterdir())
    classes_b = sorted(p.name for p in (b / "train").iterdir())
    first = tmp_path / "first"
    assert main(["--data-dir", str(a), "--out-dir", str(first), "--workers", "1", "--no-progress"]) == 0
    outcomes = []
    for k in range(1, 30):
        out = tmp_path / f"k{k}"
        shutil.copytree(first, out)
        child = mp.get_context("fork").Process(
            target=_killed_at,
            args=(k, ["--data-dir", str(b), "--out-dir", str(out), "--workers", "1", "--no-progress"]),
        )
        child.start()
        child.join(120)
        assert child.exitcode in (0, -signal.SIGKILL), child.exitcode
        try:
            classes = beton_classes(out)
        except ValueError as e:
            assert "\n" not in str(e) and str(out) in str(e)
            with pytest.raises(DataError):
                dataset_classes(out, "ffcv")
            outcomes.append("refused")
        else:
            assert dataset_classes(out, "ffcv") == classes
            widths = {int(w) for s in ("train", "val") for w in read_index(out / f"{s}.beton").metadata["f0"]["width"]}
            expected = {96, 80} if classes == classes_a else {64, 48}
            assert classes in (classes_a, classes_b) and widths == expected, (k, classes, widths)
            outcomes.append("old" if classes == classes_a else "new")
        if child.exitcode == 0:
            break
    capsys.readouterr()
    assert outcomes[0] == "old" and outcomes[-1] == "new" and "refused" in outcomes, outcomes


@pytest.mark.parametrize("layout", ["stray_val_class", "flat_val"])
def test_every_split_is_checked_before_anything_is_written(tmp_path, coded_root, capsys, layout):
    """A val split that cannot match train used to be found only after train.beton was written (hours)."""
    import shutil

    from dataset_tools.convert import main

    root = tmp_path / "data"
    shutil.copytree(coded_root, root)
    if layout == "stray_val_class":
        shutil.copytree(root / "val" / "n00000000", root / "val" / "n09999999")
    else:
        for d in list((root / "val").iterdir()):
            for f in d.iterdir():
                f.rename(root / "val" / f"{d.name}_{f.name}")
            d.rmdir()
    out = tmp_path / "out"
    code = main(["--data-dir", str(root), "--out-dir", str(out), "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert ("n09999999" if layout == "stray_val_class" else "organize-val") in err
    assert not (out / "train.beton").exists() and not (out / "classes.json").exists()


def test_converting_one_split_with_another_class_list_is_refused(tmp_path, capsys):
    """Converting val alone with other classes would orphan the folder's train.beton (labelled for the old list)."""
    from dataset_tools.convert import main

    a, b = _coded_pair(tmp_path)
    out = tmp_path / "out"
    assert main(["--data-dir", str(a), "--out-dir", str(out), "--workers", "1", "--no-progress"]) == 0
    before = (out / "classes.json").read_text()
    capsys.readouterr()
    code = main(["--data-dir", str(b), "--out-dir", str(out), "--splits", "val", "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "train.beton" in err and "--splits train,val" in err and len(err.strip().splitlines()) == 1
    assert (out / "classes.json").read_text() == before
    # the same class list: val is re-converted and train.beton stays usable
    assert (
        main(["--data-dir", str(a), "--out-dir", str(out), "--splits", "val", "--workers", "1", "--no-progress"]) == 0
    )
    from pipeline.folders import beton_classes

    assert beton_classes(out) == sorted(p.name for p in (a / "train").iterdir())


def test_output_problems_are_one_line(tmp_path, coded_root, capsys, monkeypatch):
    import errno

    from ffcv.memory_allocator import MemoryAllocator

    import dataset_tools.convert as convert_module
    from dataset_tools.convert import main

    (tmp_path / "file.txt").write_text("x")
    args = ["--data-dir", str(coded_root), "--workers", "1", "--no-progress"]
    assert main(args + ["--out-dir", str(tmp_path / "file.txt" / "sub")]) == 2  # not a folder (read-only: same path)
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "file.txt" in err and "--out-dir" in err, err

    def full(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(MemoryAllocator, "flush_page", full)  # inherited by the forked writer processes
    out = tmp_path / "full"
    assert main(args + ["--out-dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "No space left on device" in err and str(out) in err, err
    assert not (out / "train.beton").exists() and not list(out.glob(".*tmp*"))
    monkeypatch.undo()

    def full_json(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(convert_module, "write_json_atomic", full_json)
    assert main(args + ["--out-dir", str(tmp_path / "full2")]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "No space left on device" in err, err
    assert not (tmp_path / "full2" / "train.beton").exists()


def test_unreadable_input_folders_are_one_line(tmp_path, coded_root, capsys, monkeypatch):
    """chmod 000 does not stop root (the tests' user): the refusal is simulated where the listing happens."""
    import dataset_tools.files as files
    from dataset_tools.convert import main

    real = os.scandir
    denied = {str(coded_root / "train" / "n00000002"), str(coded_root / "val")}

    def scandir(path="."):
        if str(path) in denied:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(files.os, "scandir", scandir)
    code = main(["--data-dir", str(coded_root), "--out-dir", str(tmp_path / "out"), "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Permission denied" in err, err
    assert not (tmp_path / "out" / "train.beton").exists()


def test_a_rerun_with_the_same_classes_stopped_half_way_leaves_a_usable_folder(tmp_path, coded_root, monkeypatch):
    """Same class list, val fails after train was committed: train is the new one, val the previous, both usable."""
    from dataset_tools.beton_format import read_index
    from dataset_tools.convert import ConvertOptions, convert
    from pipeline.folders import beton_classes

    out = tmp_path / "out"
    convert(coded_root, out, ["train", "val"], ConvertOptions(workers=1, progress=False, seed=0))
    old_val = (out / "val.beton").read_bytes()
    import dataset_tools.convert as convert_module

    real = convert_module.write_beton

    def fail_on_val(path, items, **kw):
        if ".val.beton" in str(path):
            raise KeyboardInterrupt
        return real(path, items, **kw)

    monkeypatch.setattr(convert_module, "write_beton", fail_on_val)
    with pytest.raises(KeyboardInterrupt):
        convert(coded_root, out, ["train", "val"], ConvertOptions(workers=1, progress=False, seed=5, max_res=40))
    assert beton_classes(out) == [f"n{i:08d}" for i in range(4)]
    assert int(read_index(out / "train.beton").metadata["f0"]["width"].max()) == 40  # the new train
    assert (out / "val.beton").read_bytes() == old_val  # the previous val, still vouched for


def test_convert_says_what_the_jpeg_raw_mix_means_for_the_decoders(coded_root, tmp_path, capsys):
    from dataset_tools.convert import main as convert_main

    args = ["--data-dir", str(coded_root), "--workers", "1", "--no-progress", "--splits", "train"]
    assert convert_main(args + ["--out-dir", str(tmp_path / "jpeg"), "--compress-prob", "1"]) == 0
    assert "train: all 48 images stored as JPEG: DALI can decode this beton on the GPU" in capsys.readouterr().out
    assert convert_main(args + ["--out-dir", str(tmp_path / "mix"), "--compress-prob", "0.5"]) == 0
    out = capsys.readouterr().out
    raw = int(out.split(" of 48 images stored raw")[0].rsplit(" ", 1)[-1])
    assert 0 < raw < 48 and "--compress-prob 1 stores all as JPEG" in out
