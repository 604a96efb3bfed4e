"""The torchvision/PIL backend: the reference README's path, kept as the baseline and the last resort.

Image folders (ROOT/<split>/<wnid>/*.JPEG) read by DataLoader workers with PIL, RandomResizedCrop + flip (train) or
the 224/256 centre crop (val) on the CPU, collated as uint8 NHWC (4x less to copy than float32), pinned, then
normalised on the device with the next batch prefetched.

Randomness: the sampler hands each worker (index, epoch, resolution) keys instead of bare indices, so a sample's crop
and flip are a pure function of (seed, epoch, index) even with persistent workers, which keep their own copy of the
dataset object and never see attribute changes made in the main process.

Undecodable files (empty, truncated, not an image, unreadable): the next file in ImageFolder order that decodes takes
the sample's place, with its own label, cut at the box keyed by the original (seed, epoch, index) -- so a batch keeps
its shape and stays a pure function of (seed, epoch, index) on any number of workers, as timm's ImageDataset does.
The main process names each such file once on stderr (`skipped` keeps them) and, at the end of every epoch that met
one, says how many samples of that epoch took another file's place. A split where no file decodes within
`MAX_CONSECUTIVE_BAD` stops with one error naming the first.

Worker processes: they ignore SIGTERM/SIGINT (the trainer stops them after saving), so they are shut down by the
loader itself -- when a loop fails, and at interpreter exit (before multiprocessing's exit handler, whose SIGTERM
they would ignore, which left the process waiting for them forever) -- and they exit within a fraction of a second
when the main process is killed.
"""

from __future__ import annotations

import atexit
import functools
import os
import sys
import time
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dataset_tools.files import DataFolderError
from pipeline.contract import Loader, LoaderError, LoaderOptions, Placement, Request, device_batches
from pipeline.crops import center_crop_boxes, random_resized_crop_boxes, sample_keys
from pipeline.order import EpochPlan

MAX_CONSECUTIVE_BAD = 50  # timm's retry limit: more undecodable files in a row means a damaged folder, not a bad file
MAX_NAMED = 20  # undecodable files named one by one on stderr; more are counted


class FolderCrops(Dataset):
    """Dataset keyed by (index, epoch, resolution) -> (uint8 (R, R, 3) array, label, undecodable files passed over)."""

    def __init__(
        self,
        files: list[tuple[str, int]],
        train: bool,
        seed: int,
        scale: tuple[float, float],
        ratio: tuple[float, float],
        val_crop_ratio: float,
    ) -> None:
        self.files = files
        self.train = train
        self.seed = seed
        self.scale, self.ratio, self.val_crop_ratio = scale, ratio, val_crop_ratio

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[np.ndarray | None, int, list[tuple[str, str]]]:
        """(R x R x 3 uint8 crop, label, [(path, reason)] of the undecodable files passed over for it). The crop is
        None when no file decodes (see `failure`): an error raised in a worker would reach the user wrapped in a
        worker traceback, so it is raised by the main process instead."""
        index, epoch, resolution = key
        skipped: list[tuple[str, str]] = []
        n = len(self.files)
        for step in range(min(n, MAX_CONSECUTIVE_BAD)):
            path, label = self.files[(index + step) % n]
            try:
                im = _decode(path)
            except Exception as e:  # PIL raises many types for bad files; name the file whatever it was
                skipped.append((path, _reason(path, e)))
                continue
            return self._crop(im, index, epoch, resolution), label, skipped
        return None, -1, skipped

    def failure(self, skipped: list[tuple[str, str]]) -> str:
        """The error for a sample that found no decodable file among the ones it tried."""
        (first, reason), n = skipped[0], len(self.files)
        more = (
            f"and no file of the {n} in this split can be decoded"
            if n <= MAX_CONSECUTIVE_BAD
            else f"and neither can the next {len(skipped) - 1} files (a damaged folder?)"
        )
        return (
            f"{first}: cannot be decoded ({reason}), {more}; check the folder "
            "(rn50 convert lists undecodable files in convert_report.json)"
        )

    def _crop(self, im, index: int, epoch: int, resolution: int) -> np.ndarray:
        from PIL import Image

        width, height = im.size
        flip = False
        if self.train:
            boxes, flips = random_resized_crop_boxes(
                [height], [width], sample_keys(self.seed, epoch, [index]), self.scale, self.ratio
            )
            flip = bool(flips[0])
        else:
            boxes = center_crop_boxes([height], [width], self.val_crop_ratio)
        top, left, h, w = (int(v) for v in boxes[0])
        # One call crops and resizes (PIL antialiases when shrinking), like torchvision's F.resized_crop on PIL.
        out = im.resize((resolution, resolution), Image.BILINEAR, box=(left, top, left + w, top + h))
        if flip:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        return np.asarray(out, dtype=np.uint8)


def _decode(path: str):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")  # what torchvision's pil_loader does: CMYK, grayscale, palette -> RGB


def _reason(path: str, e: Exception) -> str:
    """Why `path` could not be decoded, without repeating its name."""
    from PIL import UnidentifiedImageError

    if isinstance(e, UnidentifiedImageError):
        return "empty file" if os.path.exists(path) and os.path.getsize(path) == 0 else "not an image"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return f"{type(e).__name__}: {e}"


def _worker_init(worker_id: int) -> None:
    """Workers leave SIGTERM/SIGINT to the main process, which stops them itself. Ctrl-C reaches every process of
    the terminal's process group (systemd's shutdown SIGTERM every process of the service), and a worker dying of
    it would fail the main process ("worker exited unexpectedly") before the trainer could save its checkpoint."""
    import signal

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)


def _start_worker(parent_pid: int | None, worker_id: int) -> None:
    from dataset_tools.processes import exit_with_parent

    exit_with_parent(parent_pid or os.getppid())  # a worker that ignores SIGTERM must still go with the main process
    _worker_init(worker_id)


def collate_uint8(
    samples: list[tuple[np.ndarray | None, int, list]],
) -> tuple[torch.Tensor | None, torch.Tensor | None, list, list | None]:
    """(images, labels, undecodable files passed over, None) -- or (None, None, ..., the failed sample's tries)."""
    skipped = [item for s in samples for item in s[2]]
    failed = next((s[2] for s in samples if s[0] is None), None)
    if failed is not None:
        return None, None, skipped, failed
    images = torch.from_numpy(np.stack([s[0] for s in samples]))
    labels = torch.tensor([s[1] for s in samples], dtype=torch.int64)
    if torch.utils.data.get_worker_info() is not None:
        # Move the batch into shared memory here, in the worker's own loop: when /dev/shm is full this raises where
        # DataLoader passes the error on to the main process. Left to the pickler, it fails in the queue's feeder
        # thread, the batch is lost without a word, and the main process waits for it forever.
        images.share_memory_()
        labels.share_memory_()
    return images, labels, skipped, None


# The DataLoaders whose loaders may hold worker processes, by the loader's id; their workers are stopped when the
# loader is collected and at interpreter exit. Held here, not through the loader, so a loader collected as garbage
# (e.g. in a traceback's reference cycle) still has its workers stopped: DataLoader's own clean-up sends SIGTERM, which
# our workers ignore, and multiprocessing's exit handler then waited for them forever. The exit hook is re-registered
# last at each loader's creation so that it runs before multiprocessing's exit handler and torch's exit flag (atexit
# runs last-in first-out), both registered when torch was imported.
_OPEN: dict[int, DataLoader] = {}


def _stop_workers(dataloader: DataLoader) -> None:
    """Stop a DataLoader's worker processes: its own shut-down (a stop message, then join), then SIGKILL for any that
    is still alive (stuck in a decode past the join timeout, or the shut-down skipped at interpreter exit)."""
    it = getattr(dataloader, "_iterator", None)
    if it is None or not hasattr(it, "_shutdown_workers"):
        return
    dataloader._iterator = None
    it._shutdown_workers()
    for w in getattr(it, "_workers", []):
        if w.is_alive():
            w.kill()
            w.join(timeout=5)


def _forget(key: int) -> None:
    dataloader = _OPEN.pop(key, None)
    if dataloader is not None:
        _stop_workers(dataloader)


def _close_open_loaders() -> None:
    for key in list(_OPEN):
        _forget(key)


def lost_worker(e: BaseException) -> LoaderError | None:
    """The one line for a DataLoader worker process that died (the out-of-memory killer, a kill -9), or None for any
    other error. torch reports it as a RuntimeError from its SIGCHLD handler wherever the main thread happens to be --
    usually in the training step, outside the loader's loop -- so the trainer asks here too."""
    text = str(e)
    if not isinstance(e, RuntimeError) or "DataLoader worker" not in text:
        return None
    if not any(words in text for words in ("exited unexpectedly", "killed by signal", "exited with code")):
        return None
    return _lost_worker_error(text.strip().splitlines()[0].rstrip(". "))


def _lost_worker_error(which: str) -> LoaderError:
    return LoaderError(
        f"the torchvision loader lost a worker process ({which}); the out-of-memory killer is the usual cause (see "
        "dmesg): use fewer --workers or a smaller --batch-size"
    )


class _PlannedBatches:
    """Batch sampler that yields the keys of the batches the loader planned for the coming epoch."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int, int]]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class TorchvisionLoader(Loader):
    backend = "torchvision"
    prefetch_factor = 2  # DataLoader's default: batches each worker prepares ahead

    def __init__(self, data_dir: str | Path, request: Request, placement: Placement, options: LoaderOptions) -> None:
        from pipeline.folders import loader_listing

        classes, files = loader_listing(data_dir, request.split, options.skip_listed_in)
        super().__init__(request, placement, num_samples=len(files), classes=classes)
        self.data_dir = Path(data_dir)
        self.workers = int(options.workers)
        crops = options.crops
        self.dataset = FolderCrops(
            files, self.split == "train", self.seed, tuple(crops.scale), tuple(crops.ratio), crops.val_crop_ratio
        )
        self._sampler = _PlannedBatches()
        self._dataloader = DataLoader(
            self.dataset,
            batch_sampler=self._sampler,
            num_workers=self.workers,
            collate_fn=collate_uint8,
            pin_memory=self.device.type == "cuda",
            persistent_workers=self.workers > 0,
            worker_init_fn=functools.partial(_start_worker, None),
            prefetch_factor=self.prefetch_factor if self.workers > 0 else None,
        )
        self.skipped: dict[str, str] = {}  # undecodable files met so far: path -> reason
        self.epoch_skips = 0  # undecodable file reads in the current loop (a bad file costs one read per epoch)
        if self.workers > 0:
            _OPEN[id(self)] = self._dataloader
            weakref.finalize(self, _forget, id(self))
            atexit.unregister(_close_open_loaders)  # registered last, so it runs before multiprocessing's handler
            atexit.register(_close_open_loaders)

    def close(self) -> None:
        """Stop the worker processes now (the next loop starts new ones). Safe to call at any time, and again."""
        _stop_workers(self._dataloader)

    def _named(self, batches: Iterable[tuple]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches without their skipped-file lists; each undecodable file is named on stderr once."""
        for images, labels, skipped, failed in batches:
            if failed is not None:
                raise DataFolderError(self.dataset.failure(failed))
            self.epoch_skips += len(skipped)
            for path, reason in skipped:
                if path in self.skipped:
                    continue
                self.skipped[path] = reason
                where = f" (rank {self.rank})" if self.world_size > 1 else ""
                if len(self.skipped) <= MAX_NAMED:
                    print(
                        f"rn50 data{where}: skipped {path}: cannot be decoded ({reason}); the next file takes its "
                        "place; remove or replace it",
                        file=sys.stderr,
                        flush=True,
                    )
                elif len(self.skipped) == MAX_NAMED + 1:
                    print(
                        f"rn50 data{where}: more than {MAX_NAMED} undecodable files in {self.data_dir / self.split}; "
                        "further ones are not named one by one (each epoch ends with the count; rn50 convert lists "
                        "them all)",
                        file=sys.stderr,
                        flush=True,
                    )
            yield images, labels

    def _batches(
        self, plan: EpochPlan, start_batch: int, resolution: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch
        self._sampler.batches = [
            [(int(i), epoch, resolution) for i in plan.batch(b)] for b in range(start_batch, plan.num_batches)
        ]
        # workers (started by this loop if none are alive) watch the process that iterates, not the one that built us
        self._dataloader.worker_init_fn = functools.partial(_start_worker, os.getpid())
        self.epoch_skips = 0
        try:
            yield from device_batches(self._named(self._dataloader), self.device, self.dtype)
            self._count_skips(epoch)
        except Exception as e:
            # a worker that dies while handing over a batch can surface as a broken connection before the process
            # can be reaped: then give its exit a moment to show
            lost = self._lost_workers(wait_s=2.0 if isinstance(e, (EOFError, ConnectionError)) else 0.0)
            self.close()  # a failed loop must not leave workers waiting for work nobody will send
            failure = self._loader_failure(e, resolution, lost)
            if failure is not None:
                raise failure from None
            raise

    def _count_skips(self, epoch: int) -> None:
        """The end-of-epoch line: how many undecodable file reads this epoch met (a bad file costs one per epoch)."""
        if self.epoch_skips:
            where = f" (rank {self.rank})" if self.world_size > 1 else ""
            print(
                f"rn50 data{where}: {self.split} epoch {epoch}: skipped {self.epoch_skips} undecodable file reads, "
                f"each sample's place taken by the next file that decodes ({len(self.skipped)} distinct files so "
                "far); remove them, or leave them out with --skip-listed-in convert_report.json",
                file=sys.stderr,
                flush=True,
            )

    def _lost_workers(self, wait_s: float) -> str | None:
        """Which worker processes of the current loop have died ("DataLoader worker (pid 123) is killed by signal 9"), or
        None; waits up to `wait_s` seconds for a death to show."""
        workers = getattr(getattr(self._dataloader, "_iterator", None), "_workers", [])
        deadline = time.monotonic() + wait_s
        while True:
            lost = [  # in torch's own words
                f"DataLoader worker (pid {w.pid}) "
                + (f"is killed by signal {-w.exitcode}" if w.exitcode < 0 else f"exited with code {w.exitcode}")
                for w in workers
                if w.exitcode  # None while alive, 0 after a clean exit
            ]
            if lost or time.monotonic() >= deadline:
                return "; ".join(lost) or None
            try:
                time.sleep(0.05)
            except RuntimeError as e:  # torch's SIGCHLD handler names the dead worker in the waiting thread
                if "DataLoader worker" not in str(e):
                    raise
                return str(e).strip().splitlines()[0]

    def _loader_failure(self, e: Exception, resolution: int, lost: str | None) -> LoaderError | None:
        """One line for what DataLoader reports as a traceback: shared memory ran out, a worker died."""
        text = str(e)
        if "unable to allocate shared memory" in text or ("No space left on device" in text and "shm" in text):
            try:
                st = os.statvfs("/dev/shm")
                size, free = st.f_blocks * st.f_frsize / 2**20, st.f_bavail * st.f_frsize / 2**20
                where = f"/dev/shm holds {size:,.0f} MB ({free:,.0f} MB free)"
            except OSError:
                where = "/dev/shm is missing or unreadable"
            batch = self.batch_size * resolution * resolution * 3 / 2**20
            held = self.workers * (self.prefetch_factor + 1)
            return LoaderError(
                f"{where}; the torchvision loader's {self.workers} worker processes hand their batches over through "
                f"it ({batch:,.1f} MB each at {resolution} px, up to about {held} at a time): give it more (docker "
                "run --shm-size=2g; or mount -o remount,size=2G /dev/shm), or use fewer --workers, or --workers 0"
            )
        return _lost_worker_error(lost) if lost else lost_worker(e)
