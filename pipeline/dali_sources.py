"""Where the DALI backend's encoded images come from: a .beton (memory-mapped) or image folders (read in order).

Both hand the pipeline one batch at a time, in our plan's order: the encoded bytes of each sample plus its stored
height and width, from which the crop boxes are computed (`pipeline.crops`), so the pixels a sample becomes are a
pure function of (seed, epoch, index) whichever source and decoder is used.

- `BetonSource`: the image bytes straight from the mapped file: a sample's bytes start at its `data_ptr` and their
  count comes from the allocation table (`dataset_tools.beton_format.image_column`); heights and widths are in the
  index, so nothing is parsed per sample. Raw samples (mode 1) are H x W x 3 pixels: the pipeline reshapes and cuts
  them instead of decoding. Before a batch goes to DALI, each JPEG's first two and last two bytes are checked (SOI
  FF D8, EOI FF D9): a damaged or truncated sample then stops the loader with a line naming it, instead of reaching
  a decoder that may crash the process (DALI's CPU decoder does on some bad inputs) or return garbage.
- `FolderSource`: the files' bytes read by a few threads; a file's size comes from its JPEG SOF or PNG IHDR header
  (PIL for other formats), parsed once and remembered.
"""

from __future__ import annotations

import io
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from dataset_tools.beton_format import JPEG_MODE, BetonFormatError, image_column, read_index
from dataset_tools.files import MissingData
from pipeline.contract import SampleError


def _pil_error(data) -> str | None:
    """Why PIL cannot decode these bytes, or None if it can (the diagnosis after DALI failed on a batch)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(bytes(data))) as im:
            im.load()
        return None
    except Exception as e:  # PIL raises many types for bad data; any of them means "undecodable"
        return f"{type(e).__name__}: {re.sub(r' <[^>]*>', '', str(e))}"


class BetonSource:
    kind = "beton"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise MissingData(
                f"{self.path}: missing; write it with rn50 convert --data-dir IMAGENET --out-dir {self.path.parent}"
            )
        try:
            column = image_column(read_index(self.path))
        except BetonFormatError as e:
            raise ValueError(str(e)) from None
        self.modes, self.heights, self.widths = column.modes, column.heights, column.widths
        self.ptrs, self.sizes, self.labels = column.ptrs, column.sizes, column.labels
        self.num_samples = len(self.labels)
        self.num_raw = column.num_raw
        self._buf: np.ndarray | None = None  # mapped on first use

    @property
    def size_hint(self) -> tuple[int, int]:
        """(width, height) of the largest stored image: the hardware decoder's preallocation hint."""
        return (int(self.widths.max()), int(self.heights.max())) if self.num_samples else (0, 0)

    def describe_storage(self) -> str:
        if self.num_raw == 0:
            return f"all {self.num_samples:,} images JPEG"
        return f"{self.num_raw:,} of {self.num_samples:,} images stored raw"

    def sample_name(self, i: int) -> str:
        return f"{self.path}: sample {i} (label {int(self.labels[i])})"

    def _buffer(self) -> np.ndarray:
        if self._buf is None:
            # a plain ndarray over the map: slicing it costs a fraction of slicing an np.memmap
            self._buf = np.memmap(self.path, dtype=np.uint8, mode="r").view(np.ndarray)
        return self._buf

    def read(self, indices: np.ndarray) -> list[np.ndarray]:
        """Views of the samples' stored bytes (no copy: DALI copies them into its own buffers)."""
        buf = self._buffer()
        self.check(indices)
        return [buf[p : p + s] for p, s in zip(self.ptrs[indices].tolist(), self.sizes[indices].tolist())]

    def check(self, indices: np.ndarray) -> None:
        """SOI at the start and EOI at the end of every JPEG sample of the batch, vectorised (a few µs)."""
        jpeg = indices[self.modes[indices] == JPEG_MODE]
        if not len(jpeg):
            return
        buf = self._buffer()
        start, end = self.ptrs[jpeg], self.ptrs[jpeg] + self.sizes[jpeg]
        ok = (buf[start] == 0xFF) & (buf[start + 1] == 0xD8) & (buf[end - 2] == 0xFF) & (buf[end - 1] == 0xD9)
        if not ok.all():
            bad = jpeg[~ok]
            more = f" (and {len(bad) - 1} more in its batch)" if len(bad) > 1 else ""
            raise SampleError(
                f"{self.sample_name(int(bad[0]))} is not a whole JPEG (no start/end marker where "
                f"the index puts it){more}: the file is damaged; re-convert it with rn50 convert, or "
                "copy it again if it came from elsewhere"
            )

    def diagnose(self, indices: np.ndarray, error: str) -> SampleError:
        """After DALI failed on a batch: decode its JPEGs with PIL to name the sample that breaks."""
        buf = self._buffer()
        for i in indices.tolist():
            if self.modes[i] != JPEG_MODE:
                continue
            why = _pil_error(buf[self.ptrs[i] : self.ptrs[i] + self.sizes[i]])
            if why:
                return SampleError(
                    f"{self.sample_name(i)} cannot be decoded ({why}); the file is damaged: "
                    "re-convert it with rn50 convert"
                )
        return SampleError(
            f"{self.path}: DALI failed on the batch of samples {indices[:4].tolist()}... which PIL "
            f"decodes (DALI: {error[:600]}); try --loader ffcv"
        )


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG's SOF marker or a PNG's IHDR, without decoding; None if neither is found."""
    n = len(data)
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 9 <= n:
            if data[i] != 0xFF:
                return None
            marker = data[i + 1]
            if marker == 0xFF:  # fill byte
                i += 1
                continue
            if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
                i += 2
                continue
            if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
                return None
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOF0..SOF15
                h, w = (data[i + 5] << 8) | data[i + 6], (data[i + 7] << 8) | data[i + 8]
                return (h, w) if h and w else None
            i += 2 + ((data[i + 2] << 8) | data[i + 3])
        return None
    if data[:8] == b"\x89PNG\r\n\x1a\n" and n >= 24 and data[12:16] == b"IHDR":
        return int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big")
    return None


class FolderSource:
    kind = "folder"

    def __init__(self, data_dir: str | Path, split: str, skip_listed_in: str | Path | None, threads: int) -> None:
        from pipeline.folders import loader_listing

        self.data_dir, self.split = Path(data_dir), split
        self.classes, files = loader_listing(data_dir, split, skip_listed_in)
        self.paths = [p for p, _ in files]
        self.labels = np.array([label for _, label in files], dtype=np.int64)
        self.num_samples = len(self.paths)
        self.num_raw = 0
        self.heights = np.full(self.num_samples, -1, np.int64)  # filled as files are first read
        self.widths = np.full(self.num_samples, -1, np.int64)
        self.modes = np.full(self.num_samples, JPEG_MODE, np.uint8)  # every file is decoded
        self._threads = max(1, min(int(threads), 8))
        self._pool: ThreadPoolExecutor | None = None

    size_hint = property(lambda self: (5980, 6430))  # ImageNet's largest image (see pipeline.dali_tuning)

    def describe_storage(self) -> str:
        return f"{self.num_samples:,} files"

    def sample_name(self, i: int) -> str:
        return f"{self.paths[i]} (sample {i}, label {int(self.labels[i])})"

    def _read_one(self, i: int) -> bytes:
        try:
            with open(self.paths[i], "rb") as f:
                return f.read()
        except OSError as e:
            raise SampleError(f"{self.sample_name(i)}: cannot be read ({e.strerror})") from None

    def read(self, indices: np.ndarray) -> list[np.ndarray]:
        ids = indices.tolist()
        if self._threads > 1 and len(ids) > 8:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="rn50-dali-read")
            data = list(self._pool.map(self._read_one, ids))
        else:
            data = [self._read_one(i) for i in ids]
        for i, d in zip(ids, data):
            if self.heights[i] < 0:
                self._learn_size(i, d)
        return [np.frombuffer(d, dtype=np.uint8) for d in data]

    def _learn_size(self, i: int, data: bytes) -> None:
        size = _header_size(data)
        if size is None:
            from PIL import Image

            try:
                with Image.open(io.BytesIO(data)) as im:
                    size = (im.height, im.width)
            except Exception as e:  # any PIL failure: the file is not an image we can read
                raise SampleError(
                    f"{self.sample_name(i)} is not a readable image ({type(e).__name__}); leave it "
                    "out with --skip-listed-in convert_report.json (rn50 convert lists such files) or "
                    "delete it"
                ) from None
        self.heights[i], self.widths[i] = size

    def diagnose(self, indices: np.ndarray, error: str) -> SampleError:
        for i in indices.tolist():
            why = _pil_error(self._read_one(i))
            if why:
                return SampleError(
                    f"{self.sample_name(i)} cannot be decoded ({why}); leave it out with "
                    "--skip-listed-in convert_report.json (rn50 convert lists such files) or delete it"
                )
        return SampleError(
            f"{self.data_dir / self.split}: DALI failed on a batch that PIL decodes "
            f"({self.paths[int(indices[0])]} ...; DALI: {error[:600]}); "
            "try --loader torchvision"
        )

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
