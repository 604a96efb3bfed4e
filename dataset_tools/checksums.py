"""Per-sample checksums of a .beton, and `verify`: is every stored image what the conversion wrote, and does it decode?

A .beton (FFCV's format, kept as it is) has no checksum, so a flipped bit in a raw sample's pixels, or in a JPEG's
entropy-coded data that leaves its markers in place, would be trained on without a word. `rn50 convert` therefore
writes beside each beton

    <split>.checksums.npy   one CRC-32 per sample (uint32, sample order) of the bytes the beton stores for its image

and the manifest names it with a digest of that array (so a checksum file from another conversion is recognised).
`rn50 inspect BETON --verify` reads every sample once: its CRC against the file (when there is one), every JPEG
decoded, every raw sample's size against its height x width x 3. Labels and the index are covered by the manifest's
fingerprint (dataset_tools.beton_folder), which every loader checks.

What stays undetectable: damage to a beton that has no checksum file (FFCV's own writer, or an rn50 convert before
checksums) inside a raw sample, or inside a JPEG's entropy-coded data when the JPEG still decodes; and damage made
before the conversion (the source JPEG itself).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dataset_tools.beton_format import JPEG_MODE, BetonFormatError, image_column, read_index

ALGORITHM = "crc32"
SUFFIX = ".checksums.npy"
CHUNK = 4096  # samples per verification task


def checksum_path(beton: str | Path) -> Path:
    """train.beton -> train.checksums.npy beside it."""
    beton = Path(beton)
    return beton.with_name(
        beton.name[: -len(".beton")] + SUFFIX if beton.name.endswith(".beton") else beton.name + SUFFIX
    )


def digest(sums: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(sums, dtype="<u4").tobytes(), digest_size=16).hexdigest()


def _crcs(path: str, ptrs: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    out = np.empty(len(ptrs), np.uint32)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        for k, (p, s) in enumerate(zip(ptrs.tolist(), sizes.tolist(), strict=True)):
            out[k] = zlib.crc32(buf[p : p + s])
    return out


def compute(beton: str | Path) -> np.ndarray:
    """The CRC-32 of every sample's stored image bytes, in sample order (one pass over the file)."""
    column = image_column(read_index(beton))
    return _crcs(str(beton), column.ptrs, column.sizes)


def write(beton: str | Path, sums: np.ndarray, target: Path | None = None) -> Path:
    """Save `sums` as the checksum file of `beton` (or at `target`), atomically."""
    target = Path(target) if target is not None else checksum_path(beton)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(sums, dtype="<u4"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    return target


def manifest_entry(sums: np.ndarray, beton: str | Path) -> dict:
    return {"file": checksum_path(beton).name, "algorithm": ALGORITHM, "digest": digest(sums), "samples": len(sums)}


@dataclass
class Problem:
    index: int
    label: int
    reason: str


@dataclass
class VerifyReport:
    beton: Path
    samples: int
    checked_sums: bool  # False: no checksum file; only decodes and sizes were checked
    note: str | None  # why sums were not checked, or a warning about the checksum file
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def by_label(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for p in self.problems:
            counts[p.label] = counts.get(p.label, 0) + 1
        return dict(sorted(counts.items()))


def load_sums(beton: Path, manifest: dict | None, split: str | None) -> tuple[np.ndarray | None, str | None]:
    """(the checksums, None) or (None, why not). The manifest's digest, when it names one, must match the file."""
    path = checksum_path(beton)
    if not path.is_file():
        return None, (
            f"no {path.name} beside it (written by FFCV's own writer, or by an rn50 convert before checksums): raw "
            "samples cannot be checked, JPEGs are decoded"
        )
    try:
        sums = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        return None, f"{path}: unreadable ({e}); re-convert, or delete it to verify decodes only"
    entry = ((manifest or {}).get("splits", {}).get(split) or {}).get("checksums") if split else None
    if entry and entry.get("digest") != digest(sums):
        return None, f"{path} is not the one the manifest names (an interrupted conversion?); re-convert"
    return sums.astype(np.uint32, copy=False), None


def _check_chunk(args) -> list[tuple[int, str]]:
    """(index, reason) of every bad sample in one chunk: CRC mismatch, a JPEG that does not decode."""
    path, start, ptrs, sizes, modes, heights, widths, expected = args
    from dataset_tools.files import turbojpeg_decoder

    decoder, bad = turbojpeg_decoder(), []
    crcs = _crcs(path, ptrs, sizes) if expected is not None else None
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        for k in range(len(ptrs)):
            i = start + k
            if crcs is not None and crcs[k] != expected[k]:
                bad.append((i, f"checksum mismatch (stored {expected[k]:08x}, read {crcs[k]:08x})"))
                continue
            if modes[k] == JPEG_MODE:
                why = jpeg_problem(buf[ptrs[k] : ptrs[k] + sizes[k]], int(widths[k]), int(heights[k]), decoder)
                if why:
                    bad.append((i, why))
    return bad


def jpeg_problem(data: bytes, width: int, height: int, decoder=None) -> str | None:
    """Why a stored JPEG is not the width x height image its index promises, or None. TurboJPEG (FFCV's binding,
    when FFCV is installed) refuses any warning -- a premature end, corrupt entropy data -- as the ffcv loader does;
    PIL otherwise (it refuses truncation, but decodes some corrupt data without a word)."""
    if data[:2] != b"\xff\xd8" or data[-2:] != b"\xff\xd9":
        return "JPEG without its start or end marker"
    if decoder is not None:
        from dataset_tools.files import _decode_turbojpeg

        if _decode_turbojpeg(decoder, data, width, height, width, height) is None:
            return "JPEG that does not decode cleanly (TurboJPEG)"
        return None
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            size = im.size
    except Exception as e:  # PIL raises many types for bad data; each is a reason
        return f"JPEG that does not decode ({type(e).__name__}: {e})"
    return None if size == (width, height) else f"JPEG of {size[0]}x{size[1]}, the index says {width}x{height}"


def verify(beton: str | Path, workers: int = 1, progress: bool = True) -> VerifyReport:
    """Check every sample of `beton` (see the module docstring). BetonFormatError for a damaged index."""
    from dataset_tools.beton_folder import read_manifest

    beton = Path(beton)
    index = read_index(beton)
    column = image_column(index)  # raw sizes against height x width x 3 are checked here, for every sample
    split = beton.name[: -len(".beton")] if beton.name.endswith(".beton") else None
    try:
        manifest = read_manifest(beton.parent)
    except Exception:  # an unreadable manifest: the loaders say so; verify the samples regardless
        manifest = None
    sums, note = load_sums(beton, manifest, split)
    n = len(column.labels)
    if sums is not None and len(sums) != n:
        sums, note = None, f"{checksum_path(beton).name} holds {len(sums)} checksums for {n} samples; re-convert"
    report = VerifyReport(beton, n, sums is not None, note)
    tasks = [
        (
            str(beton),
            s,
            column.ptrs[s : s + CHUNK],
            column.sizes[s : s + CHUNK],
            column.modes[s : s + CHUNK],
            column.heights[s : s + CHUNK],
            column.widths[s : s + CHUNK],
            sums[s : s + CHUNK] if sums is not None else None,
        )
        for s in range(0, n, CHUNK)
    ]
    from dataset_tools.progress import progress as progress_bar

    bar = progress_bar(n, f"verify {beton.name}", "img", disable=not progress)
    try:
        if workers <= 1 or len(tasks) <= 1:
            results = map(_check_chunk, tasks)
        else:
            pool = ProcessPoolExecutor(max_workers=workers)
            results = pool.map(_check_chunk, tasks)
        for task, found in zip(tasks, results, strict=True):
            report.problems += [Problem(i, int(column.labels[i]), why) for i, why in found]
            bar.update(len(task[2]))
    finally:
        bar.close()
        if workers > 1 and len(tasks) > 1:
            pool.shutdown()
    return report


def spot_check(beton: str | Path, n: int = 256, seed: int = 0) -> dict:
    """`n` random samples against the checksum file, in well under a second (`rn50 doctor`'s look; `verify` reads
    everything). {"state": "none" | "ok" | "failed" | "unusable", "checked", "bad": [sample, ...], "note"}."""
    from dataset_tools.beton_folder import read_manifest

    beton = Path(beton)
    split = beton.name[: -len(".beton")] if beton.name.endswith(".beton") else None
    try:
        manifest = read_manifest(beton.parent)
    except Exception:
        manifest = None
    sums, note = load_sums(beton, manifest, split)
    if sums is None:
        return {
            "state": "none" if not checksum_path(beton).is_file() else "unusable",
            "checked": 0,
            "bad": [],
            "note": note,
        }
    column = image_column(read_index(beton))
    if len(sums) != len(column.labels):
        return {
            "state": "unusable",
            "checked": 0,
            "bad": [],
            "note": f"{len(sums)} checksums for {len(column.labels)} samples",
        }
    pick = np.sort(np.random.default_rng(seed).choice(len(sums), size=min(n, len(sums)), replace=False))
    found = _crcs(str(beton), column.ptrs[pick], column.sizes[pick])
    bad = pick[found != sums[pick]].tolist()
    return {"state": "failed" if bad else "ok", "checked": len(pick), "bad": bad, "note": None}


__all__ = ["ALGORITHM", "BetonFormatError", "VerifyReport", "checksum_path", "compute", "spot_check", "verify", "write"]
