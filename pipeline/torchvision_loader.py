"""The torchvision/PIL backend: the reference README's path, kept as the baseline and the last resort.

Image folders (ROOT/<split>/<wnid>/*.JPEG) read by DataLoader workers with PIL, RandomResizedCrop + flip (train) or
the 224/256 centre crop (val) on the CPU, collated as uint8 NHWC (4x less to copy than float32), pinned, then
normalised on the device with the next batch prefetched.

Randomness: the sampler hands each worker (index, epoch, resolution) keys instead of bare indices, so a sample's crop
and flip are a pure function of (seed, epoch, index) even with persistent workers, which keep their own copy of the
dataset object and never see attribute changes made in the main process.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.contract import VAL_CROP_RATIO, Loader, device_batches
from pipeline.crops import center_crop_boxes, random_resized_crop_boxes, sample_keys
from pipeline.order import EpochPlan


class FolderCrops(Dataset):
    """Dataset keyed by (index, epoch, resolution) -> (uint8 (R, R, 3) array, label)."""

    def __init__(self, files: list[tuple[str, int]], train: bool, seed: int, scale: tuple[float, float],
                 ratio: tuple[float, float], val_crop_ratio: float) -> None:
        self.files = files
        self.train = train
        self.seed = seed
        self.scale, self.ratio, self.val_crop_ratio = scale, ratio, val_crop_ratio

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[np.ndarray, int]:
        from PIL import Image

        index, epoch, resolution = key
        path, label = self.files[index]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")  # what torchvision's pil_loader does: CMYK, grayscale, palette -> RGB
        except Exception as e:  # PIL raises many types for bad files; name the file whatever it was
            raise RuntimeError(f"{path}: cannot be decoded ({type(e).__name__}: {e}); remove or replace it "
                               "(rn50 convert lists such files in convert_report.json)") from None
        width, height = im.size
        flip = False
        if self.train:
            boxes, flips = random_resized_crop_boxes([height], [width], sample_keys(self.seed, epoch, [index]),
                                                     self.scale, self.ratio)
            flip = bool(flips[0])
        else:
            boxes = center_crop_boxes([height], [width], self.val_crop_ratio)
        top, left, h, w = (int(v) for v in boxes[0])
        # One call crops and resizes (PIL antialiases when shrinking), like torchvision's F.resized_crop on PIL.
        out = im.resize((resolution, resolution), Image.BILINEAR, box=(left, top, left + w, top + h))
        if flip:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        return np.asarray(out, dtype=np.uint8), label


def _worker_init(worker_id: int) -> None:
    """Workers leave SIGTERM/SIGINT to the main process, which stops them itself. Ctrl-C reaches every process of
    the terminal's process group (systemd's shutdown SIGTERM every process of the service), and a worker dying of
    it would fail the main process ("worker exited unexpectedly") before the trainer could save its checkpoint.
    A worker still exits when the main process is gone (DataLoader's watchdog)."""
    import signal

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)


def collate_uint8(samples: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(np.stack([s[0] for s in samples]))
    labels = torch.tensor([s[1] for s in samples], dtype=torch.int64)
    return images, labels


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

    def __init__(self, data_dir: str | Path, *, split: str, batch_size: int, resolution: int, workers: int,
                 device: torch.device | str, dtype: torch.dtype, rank: int, world_size: int, seed: int,
                 drop_last: bool, scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 val_crop_ratio: float = VAL_CROP_RATIO, prefetch_factor: int = 2,
                 skip_listed_in: str | Path | None = None) -> None:
        from pipeline.folders import loader_listing

        classes, files = loader_listing(data_dir, split, skip_listed_in)
        super().__init__(split=split, batch_size=batch_size, resolution=resolution, num_samples=len(files),
                         classes=classes, drop_last=drop_last, rank=rank, world_size=world_size, seed=seed,
                         device=device, dtype=dtype)
        self.data_dir = Path(data_dir)
        self.workers = int(workers)
        self.dataset = FolderCrops(files, split == "train", self.seed, tuple(scale), tuple(ratio), val_crop_ratio)
        self._sampler = _PlannedBatches()
        self._dataloader = DataLoader(
            self.dataset, batch_sampler=self._sampler, num_workers=self.workers, collate_fn=collate_uint8,
            pin_memory=self.device.type == "cuda", persistent_workers=self.workers > 0, worker_init_fn=_worker_init,
            prefetch_factor=prefetch_factor if self.workers > 0 else None)

    def _batches(self, plan: EpochPlan, start_batch: int, resolution: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch
        self._sampler.batches = [[(int(i), epoch, resolution) for i in plan.batch(b)]
                                 for b in range(start_batch, plan.num_batches)]
        yield from device_batches(self._dataloader, self.device, self.dtype)
