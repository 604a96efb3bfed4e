"""The DALI backend (fallback when there are no betons): JPEGs decoded on the GPU straight from the image folders.

`imagenet_pipeline` is one decorated function, as in DALI's ResNet-50 example: `fn.readers.file` reads this rank's
files, `fn.decoders.image_random_crop` on device="mixed" decodes only the random crop (nvJPEG, plus the A100/H100
hardware JPEG decoder for `hw_decoder_load` of the images), `fn.resize` and `fn.crop_mirror_normalize` run on the GPU
and emit HWC: the batch arrives as (B, R, R, 3), and permuting it to (B, 3, R, R) *is* channels_last, so no copy is
spent on the layout. Without a GPU the same pipeline runs on the CPU (device_id=None, decoders on "cpu"), which is how
the tests run it.

Order and sharding are ours (`pipeline.order.plan_epoch`): the reader gets this rank's file list for the epoch, in
order, with `num_shards=1`, because DALI's own sharding cuts contiguous blocks with its own padding rule and its
shuffle is not a function of the epoch. A pipeline is built per epoch (a fraction of a second; an epoch takes
minutes), which is what lets the list change. Last batch: the list is already cut to whole batches when drop_last,
so the iterator's policy is DROP; otherwise PARTIAL (a short last batch).

What holds for determinism: the order, the shards and `set_epoch(e, start_batch)` are exact, as on every backend.
The crops and flips come from DALI's own generators, seeded from (seed, epoch, rank, start_batch): the same epoch
gives the same augmentation when started from the same batch. DALI draws per pipeline, not per sample index, so
for a mid-epoch resume the train pipeline runs with DALI's checkpointing (`enable_checkpointing`): `position_state()`
serialises the reader position and the random operators' states after the batches handed out, and a loop started
through `restore_position` rebuilds the epoch's pipeline from that checkpoint, so the remaining batches are cut as
the uninterrupted epoch would have cut them (checked on the CPU; on the GPU this rests on DALI's checkpointing of
the mixed decoder's random crop, which this project could not test without a GPU). Without such a state (a
checkpoint written by another backend) a resumed epoch gets the right samples with different crops. A DALI build
that cannot checkpoint one of these operators is met by rebuilding the pipeline without checkpointing (one line on
stderr says so): training goes on, and resumes then hold that weaker guarantee.

Corrupt files: DALI cannot skip an undecodable file; the whole pipeline stops (NVIDIA/DALI#3913). `rn50 convert`
lists such files in convert_report.json ("skipped"); pass that report as `skip_listed_in=` (build_loader) to leave
them out, or delete them from the folders.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from pipeline.contract import IMAGENET_MEAN, IMAGENET_STD, VAL_CROP_RATIO, Loader
from pipeline.crops import sample_keys
from pipeline.order import EpochPlan

# ImageNet's largest image, so the hardware decoder's buffers are allocated once (DALI's ResNet-50 example).
_WIDTH_HINT, _HEIGHT_HINT = 5980, 6430


@pipeline_def
def imagenet_pipeline(files: list[str], labels: list[int], *, train: bool, resolution: int, gpu: bool,
                      scale: tuple[float, float], ratio: tuple[float, float], val_crop_ratio: float,
                      hw_decoder_load: float, half: bool):
    jpegs, labels_out = fn.readers.file(files=files, labels=labels, random_shuffle=False, name="Reader")
    decoder = dict(device="mixed", hw_decoder_load=hw_decoder_load, preallocate_width_hint=_WIDTH_HINT,
                   preallocate_height_hint=_HEIGHT_HINT) if gpu else dict(device="cpu")
    if train:
        images = fn.decoders.image_random_crop(jpegs, output_type=types.RGB, random_area=list(scale),
                                               random_aspect_ratio=list(ratio), num_attempts=10, **decoder)
        images = fn.resize(images, resize_x=resolution, resize_y=resolution)
        mirror = fn.random.coin_flip(probability=0.5)
        crop = None
    else:
        images = fn.decoders.image(jpegs, output_type=types.RGB, **decoder)
        # shorter side to R / ratio, then the centre R x R: the same square as the other backends' centre crop
        images = fn.resize(images, resize_shorter=round(resolution / val_crop_ratio))
        mirror, crop = 0, (resolution, resolution)
    images = fn.crop_mirror_normalize(images, dtype=types.FLOAT16 if half else types.FLOAT, output_layout="HWC",
                                      crop=crop, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD), mirror=mirror)
    return images, (labels_out.gpu() if gpu else labels_out)


class DALILoader(Loader):
    backend = "dali"

    def __init__(self, data_dir: str | Path, *, split: str, batch_size: int, resolution: int, workers: int,
                 device: torch.device | str, dtype: torch.dtype, rank: int, world_size: int, seed: int,
                 drop_last: bool, scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 val_crop_ratio: float = VAL_CROP_RATIO, hw_decoder_load: float = 0.65,
                 skip_listed_in: str | Path | None = None) -> None:
        from pipeline.folders import loader_listing

        classes, files = loader_listing(data_dir, split, skip_listed_in)
        super().__init__(split=split, batch_size=batch_size, resolution=resolution, num_samples=len(files),
                         classes=classes, drop_last=drop_last, rank=rank, world_size=world_size, seed=seed,
                         device=device, dtype=dtype)
        if not 0.0 <= hw_decoder_load <= 1.0:
            raise ValueError(f"hw_decoder_load must be in [0, 1], got {hw_decoder_load}")
        self.data_dir = Path(data_dir)
        self.workers = max(1, int(workers))
        self.scale, self.ratio, self.val_crop_ratio = tuple(scale), tuple(ratio), val_crop_ratio
        self.hw_decoder_load = hw_decoder_load
        self._paths = np.array([p for p, _ in files])
        self._labels = np.array([label for _, label in files], dtype=np.int64)
        self._iterator: DALIGenericIterator | None = None  # the running loop's, for position_state()
        self._restore: tuple[int, int, bytes] | None = None  # (epoch, batch, DALI checkpoint) for the next loop
        self._checkpointing = True  # False once this DALI build refused to checkpoint the pipeline

    @property
    def _checkpoints_pipeline(self) -> bool:
        """Whether loops run DALI's checkpointing: train pipelines only (val has no random state), while this DALI
        build supports it."""
        return self.shuffle and self._checkpointing

    def pipeline_seed(self, epoch: int, start_batch: int) -> int:
        key = sample_keys(self.seed, epoch, [(self.rank << 32) + start_batch])[0]
        return int(key & np.uint64(0x7FFFFFFF))

    def position_state(self) -> dict | None:
        if self._iterator is None:
            return None
        # a uint8 tensor rather than bytes: plain tensors are what torch.load(weights_only=True) reads back
        data = self._iterator.checkpoints()[0]
        return {"dali_checkpoint": torch.frombuffer(bytearray(data), dtype=torch.uint8)}

    def restore_position(self, epoch: int, batch: int, state: dict | None) -> None:
        self._restore = None
        if state and state.get("dali_checkpoint") is not None:
            self._restore = (int(epoch), int(batch), state["dali_checkpoint"].numpy().tobytes())

    def _start(self, plan: EpochPlan, start_batch: int, resolution: int, checkpoint: bytes | None) -> DALIGenericIterator:
        """This loop's pipeline and iterator (DALIGenericIterator builds the pipeline). With a DALI checkpoint the
        pipeline covers the whole epoch and DALI fast-forwards it to the checkpoint's batch."""
        checkpointing = self._checkpoints_pipeline
        checkpoint = checkpoint if checkpointing else None
        first = 0 if checkpoint is not None else start_batch
        indices = plan.indices[first * self.batch_size:]
        gpu = self.device.type == "cuda"
        pipe = imagenet_pipeline(
            files=self._paths[indices].tolist(), labels=self._labels[indices].tolist(), train=self.shuffle,
            resolution=resolution, gpu=gpu, scale=self.scale, ratio=self.ratio, val_crop_ratio=self.val_crop_ratio,
            hw_decoder_load=self.hw_decoder_load, half=self.dtype == torch.float16, batch_size=self.batch_size,
            num_threads=self.workers, device_id=(self.device.index or 0) if gpu else None,
            seed=self.pipeline_seed(self.epoch, first), prefetch_queue_depth=2, enable_checkpointing=checkpointing,
            checkpoint=checkpoint)
        policy = LastBatchPolicy.DROP if self.drop_last else LastBatchPolicy.PARTIAL
        try:
            return DALIGenericIterator(pipe, ["images", "labels"], reader_name="Reader", last_batch_policy=policy,
                                       auto_reset=False)
        except RuntimeError as e:
            # An operator of this DALI build without checkpointing support ("Checkpointing is not implemented for
            # this operator"): train on without it rather than not at all.
            if not checkpointing or "checkpointing" not in str(e).lower():
                raise
            self._checkpointing = False
            print(f"rn50 dali: this DALI cannot checkpoint the pipeline ({str(e).strip().splitlines()[-1]}); "
                  "training goes on without it: a mid-epoch resume reads the same samples with other crops",
                  file=sys.stderr, flush=True)
            return self._start(plan, start_batch, resolution, None)

    def _batches(self, plan: EpochPlan, start_batch: int, resolution: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        restore, self._restore = self._restore, None
        if len(plan.indices[start_batch * self.batch_size:]) == 0:
            return
        checkpoint = None
        if restore is not None and restore[:2] == (self.epoch, start_batch):
            checkpoint = restore[2]  # the epoch's whole pipeline, fast-forwarded by DALI to where it was taken
        try:
            it = self._start(plan, start_batch, resolution, checkpoint)
            self._iterator = it if self._checkpoints_pipeline else None
            for batch in it:
                images, labels = batch[0]["images"], batch[0]["labels"]
                # HWC from DALI -> NCHW view with channels_last strides; only bfloat16 needs a conversion here
                images = images.permute(0, 3, 1, 2).to(dtype=self.dtype, memory_format=torch.channels_last)
                yield images.to(self.device), labels.view(-1).to(device=self.device, dtype=torch.int64)
        except RuntimeError as e:
            raise RuntimeError(f"DALI stopped reading {self.data_dir / self.split}: {e}\nDALI cannot skip an "
                               "undecodable file: find it with rn50 convert (convert_report.json lists skipped files) "
                               "and pass that report as skip_listed_in=, or use the ffcv/torchvision backend") from e
        finally:
            self._iterator = None
