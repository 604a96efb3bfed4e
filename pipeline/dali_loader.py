"""The DALI backend: JPEGs decoded by DALI -- nvJPEG and the A100/H100/H200 hardware decoder on a GPU, libjpeg-turbo
threads on the CPU -- from a .beton (preferred) or from image folders, with the crops every other backend cuts.

One pipeline per loader, built once (`builds` counts it), fed by `fn.external_source` in batch mode. Each batch our
callback hands DALI: the encoded bytes of the plan's next samples (`pipeline.dali_sources`), the crop box of each
(`pipeline.crops`: RandomResizedCrop from (seed, epoch, index) and the stored height/width for train, the val
centre crop for val -- the boxes the ffcv and torchvision backends cut), the flip, the output side and the labels.
The graph then decodes only the box (`fn.decoders.image_slice`, an ROI decode; device="mixed" on a GPU, "cpu"
without one), resizes it to R x R (antialiased), flips and normalises it in `fn.crop_mirror_normalize`, which
emits HWC: permuting the (B, R, R, 3) batch to (B, 3, R, R) *is* channels_last, so no copy is spent on the layout.
It emits FLOAT16 for float16 and bfloat16 (then converted in torch, 2 bytes to 2 bytes: no float32 batch is ever
made) and FLOAT for float32. Raw samples of a .beton (rn50 convert stores half the images raw by default) take a
DALI conditional branch that reshapes and cuts their pixels instead of decoding them; an all-JPEG beton gets a graph
without that branch.

What stays fixed while the pipeline lives: the graph and the knobs (`pipeline.dali_tuning`). What changes without a
rebuild: the epoch, the start batch and the order (they are the callback's), and the resolution (a per-sample
argument of the resize). Each loop is one DALI "epoch": the callback raises StopIteration after the loop's last
batch and the pipeline is reset for the next. A loop abandoned mid-epoch (a `break`) leaves up to `prefetch`
batches of the old position queued: the next loop first runs them out and drops them (no rebuild).

Determinism and resume: the order, the shards, the crops and the flips are pure functions of (seed, epoch, sample
index), so `set_epoch(e, k)` is an exact mid-epoch resume and no DALI state needs checkpointing. DALI's own random
operators are not used.

Feed thread (`DALIOptions.feed_thread`, off by default until measured on a GPU): DALI runs an external source's
callback in the thread that calls `schedule_run`, and copies the batch's bytes there, so without it the training
thread spends that time between its steps (a median 12 ms per batch of 256 on this project's 2-core CPU). With it, a
thread of the loader's own schedules, takes each batch (on a CUDA stream of its own, copied out of DALI's buffers
before they are released) and queues it with an event; the training thread waits on the event on its own stream,
never on the host. The batches, their order and their crops are the same either way.

Damaged data: each JPEG sample's start and end markers are checked before DALI sees the batch, and if DALI still
fails on a batch, its samples are decoded with PIL to name the one that breaks: a `SampleError` (one line: file,
sample index, label, fix) either way.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types

from dataset_tools.beton_format import RAW_MODE
from pipeline.contract import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Crops,
    Loader,
    LoaderOptions,
    Placement,
    Request,
    error_chain,
)
from pipeline.crops import center_crop_boxes, random_resized_crop_boxes, sample_keys
from pipeline.dali_sources import BetonSource, FolderSource
from pipeline.dali_tuning import MIB, DaliTuning, resolve_tuning
from pipeline.order import EpochPlan

SOURCES = ("auto", "beton", "folder")
_DTYPES = [types.UINT8, types.INT32, types.INT32, types.INT32, types.FLOAT, types.INT64]
_RAW_DTYPES = [types.BOOL, types.INT32]


def _graph(callback, *, raw: bool, gpu: bool, half: bool, decoder: dict):
    """The pipeline's operators. `raw`: the source holds raw samples, decided per sample by a DALI conditional."""
    outputs = fn.external_source(
        source=callback, num_outputs=6 + 2 * raw, batch=True, batch_info=True, dtype=_DTYPES + _RAW_DTYPES * raw
    )
    data, anchor, shape, mirror, size, labels = outputs[:6]
    if raw:
        is_raw, hwc = outputs[6:]
        if is_raw:
            images = fn.slice(
                fn.reshape(data, shape=hwc, layout="HWC"), anchor, shape, axis_names="HW", out_of_bounds_policy="error"
            )
            images = images.gpu() if gpu else images
        else:
            images = fn.decoders.image_slice(data, anchor, shape, axis_names="HW", **decoder)
    else:
        images = fn.decoders.image_slice(data, anchor, shape, axis_names="HW", **decoder)
    images = fn.resize(images, size=size, antialias=True)
    images = fn.crop_mirror_normalize(
        images,
        dtype=types.FLOAT16 if half else types.FLOAT,
        output_layout="HWC",
        mirror=mirror,
        mean=list(IMAGENET_MEAN),
        std=list(IMAGENET_STD),
    )
    return images, labels.gpu() if gpu else labels


@dataclass
class _Feed:
    """What the callback hands out for the running loop: (batch number, dataset indices) pairs, in order."""

    batches: Iterator[tuple[int, np.ndarray]]
    epoch: int
    resolution: int


class _Feeder:
    """external_source's callback: the next batch of the running loop, or StopIteration at its end.

    It holds what a batch needs and never the loader, so no reference cycle runs through the pipeline and a dropped
    loader frees its pipeline at once. (A pipeline left to the garbage collector can be finalised in a process
    forked meanwhile -- rn50 convert's writers are forked -- where DALI's destructor waits forever for threads the
    child does not have.)"""

    def __init__(self, source, *, shuffle: bool, seed: int, crops: Crops) -> None:
        self.source, self.shuffle, self.seed = source, shuffle, seed
        self.scale, self.ratio, self.val_crop_ratio = tuple(crops.scale), tuple(crops.ratio), crops.val_crop_ratio
        self.feed: _Feed | None = None
        self.pending: deque[tuple[int, np.ndarray]] = deque()  # batches handed to DALI, not yet handed out

    def __call__(self, info):
        feed = self.feed
        item = next(feed.batches, None) if feed is not None else None
        if item is None:
            raise StopIteration
        b, indices = item
        src = self.source
        data = src.read(indices)  # first, so a folder source knows the sizes of these files
        heights, widths = src.heights[indices], src.widths[indices]
        n = len(indices)
        if self.shuffle:
            boxes, flips = random_resized_crop_boxes(
                heights, widths, sample_keys(self.seed, feed.epoch, indices), self.scale, self.ratio
            )
        else:
            boxes, flips = center_crop_boxes(heights, widths, self.val_crop_ratio), np.zeros(n, bool)
        out = [
            data,
            boxes[:, :2].astype(np.int32),
            boxes[:, 2:].astype(np.int32),
            flips.astype(np.int32),
            np.full((n, 2), feed.resolution, np.float32),
            src.labels[indices],
        ]
        if src.num_raw:
            out += [src.modes[indices] == RAW_MODE, np.stack([heights, widths, np.full(n, 3)], 1).astype(np.int32)]
        self.pending.append((b, indices))
        return tuple(out)


class DALILoader(Loader):
    backend = "dali"

    def __init__(self, data_dir: str | Path, request: Request, placement: Placement, options: LoaderOptions) -> None:
        from pipeline.folders import beton_classes, has_beton

        data_dir, split, source, dali = Path(data_dir), request.split, options.dali.source, options.dali
        if source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
        if source == "auto":
            source = "beton" if has_beton(data_dir, split) else "folder"
        if source == "beton":
            self.source = BetonSource(data_dir / f"{split}.beton")
            classes = beton_classes(data_dir)
        else:
            self.source = FolderSource(data_dir, split, options.skip_listed_in, max(1, int(options.workers)))
            classes = self.source.classes
        super().__init__(request, placement, num_samples=self.source.num_samples, classes=classes)
        self.data_dir, self.crops = data_dir, options.crops
        self.tuning: DaliTuning = resolve_tuning(
            self.device,
            options.workers,
            self.source.size_hint,
            hw_decoder_load=dali.hw_decoder_load,
            threads=dali.threads,
            prefetch=dali.prefetch,
            nvjpeg_padding_mb=dali.nvjpeg_padding_mb,
        )
        self.feed_thread = bool(dali.feed_thread)
        self.builds = 0  # pipelines built by this loader: 1 for its whole life, unless a DALI error forced another
        self._pipe = None
        self._feeder = _Feeder(self.source, shuffle=self.shuffle, seed=self.seed, crops=self.crops)
        self._owner: object | None = None  # the loop that owns the pipeline's current DALI epoch
        self._unfinished = False  # a DALI epoch was left with batches queued (an abandoned loop)

    @property
    def source_kind(self) -> str:
        return self.source.kind

    @property
    def _gpu(self) -> bool:
        return self.device.type == "cuda"

    def describe(self) -> str:
        t = self.tuning
        knobs = (
            f"hw_decoder_load {t.hw_decoder_load}, {t.threads} threads, prefetch {t.prefetch}, nvJPEG padding "
            f"{t.device_padding_mb}/{t.host_padding_mb} MiB"
            if self._gpu
            else f"{t.threads} threads"
        )
        return f"{super().describe()}; from the {self.source.kind} ({self.source.describe_storage()}); {knobs}"

    def close(self) -> None:
        """Free the pipeline (its pinned and device buffers) and the folder source's threads now; a later loop
        builds a new pipeline."""
        self._discard_pipeline()
        if isinstance(self.source, FolderSource):
            self.source.close()

    # ------------------------------------------------------------------ the pipeline and its callback

    def _pipeline(self):
        if self._pipe is None:
            t, raw = self.tuning, self.source.num_raw > 0
            decoder = dict(device="mixed" if self._gpu else "cpu", output_type=types.RGB, adjust_orientation=False)
            if self._gpu:
                decoder.update(
                    hw_decoder_load=t.hw_decoder_load,
                    device_memory_padding=t.device_padding_mb * MIB,
                    host_memory_padding=t.host_padding_mb * MIB,
                    preallocate_width_hint=t.width_hint,
                    preallocate_height_hint=t.height_hint,
                )
            device_id = (
                (self.device.index if self.device.index is not None else torch.cuda.current_device())
                if self._gpu
                else None
            )
            build = pipeline_def(_graph, enable_conditionals=raw)
            self._pipe = build(
                self._feeder,
                raw=raw,
                gpu=self._gpu,
                half=self.dtype != torch.float32,
                decoder=decoder,
                batch_size=self.batch_size,
                num_threads=t.threads,
                device_id=device_id,
                prefetch_queue_depth=t.prefetch,
                seed=0,
            )
            self._pipe.build()
            self.builds += 1
        return self._pipe

    def _discard_pipeline(self) -> None:
        """After an error inside DALI the pipeline's state is unknown: the next loop builds a fresh one."""
        self._pipe, self._feeder.feed, self._owner, self._unfinished = None, None, None, False
        self._feeder.pending.clear()

    def _finish_abandoned(self) -> None:
        """Run out the batches an abandoned loop left queued and drop them, so the next loop starts clean."""
        pipe, self._feeder.feed = self._pipe, None
        try:
            while True:
                pipe.schedule_run()  # the callback now raises StopIteration: nothing new is queued
                try:
                    pipe.share_outputs()
                except StopIteration:
                    break
                pipe.release_outputs()
            pipe.reset()
        except Exception:  # a failure in batches nobody will see: start over with a fresh pipeline
            self._discard_pipeline()
            return
        self._feeder.pending.clear()
        self._unfinished = False

    def _to_torch(self, outputs) -> tuple[torch.Tensor, torch.Tensor]:
        if self._gpu:
            with torch.cuda.device(self.device):
                images, labels = torch.from_dlpack(outputs[0].as_tensor()), torch.from_dlpack(outputs[1].as_tensor())
        else:
            images, labels = torch.from_dlpack(outputs[0].as_tensor()), torch.from_dlpack(outputs[1].as_tensor())
        if self.dtype == torch.bfloat16:
            images = images.to(torch.bfloat16)  # DALI emitted float16: a 2-byte to 2-byte cast, still NHWC
        elif self._gpu:
            # The batch is handed out after release_outputs, which gives DALI's buffers back for the batches to come:
            # a view of them could be overwritten while the step still reads it. The cast above is already a copy;
            # float16/float32 need one (tens of microseconds on the device; DALI's PyTorch iterator copies too).
            images = images.clone()
        labels = labels.view(-1).to(torch.int64)
        if self._gpu:
            labels = labels.clone()  # int64 already: `to` returned the view of DALI's buffer
        # NHWC -> an NCHW view with channels_last strides: no copy
        return images.permute(0, 3, 1, 2), labels

    # ------------------------------------------------------------------ the loop

    def _batches(
        self, plan: EpochPlan, start_batch: int, resolution: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if start_batch >= plan.num_batches:
            return
        pipe = self._pipeline()
        if self._unfinished:
            self._finish_abandoned()
            pipe = self._pipeline()
        token = object()
        self._owner, self._unfinished = token, True
        feeder = self._feeder
        feeder.pending.clear()
        feeder.feed = _Feed(((b, plan.batch(b)) for b in range(start_batch, plan.num_batches)), self.epoch, resolution)
        if self.feed_thread:
            try:
                yield from self._fed_by_thread(pipe, token)
            finally:
                if self._owner is token:
                    self._owner, feeder.feed = None, None
            return
        stream = torch.cuda.current_stream(self.device) if self._gpu else None
        try:
            self._schedule(pipe)
            while True:
                try:
                    outputs = pipe.share_outputs(stream) if stream is not None else pipe.share_outputs()
                except StopIteration:
                    break
                except Exception as e:  # DALI failed on the batch at the head of the queue: name its culprit
                    failed = feeder.pending[0][1] if feeder.pending else np.zeros(0, np.int64)
                    self._discard_pipeline()
                    raise self.source.diagnose(failed, error_chain(e)) from e
                feeder.pending.popleft()
                batch = self._to_torch(outputs)
                pipe.release_outputs()
                self._schedule(pipe)
                yield batch
                if self._owner is not token:
                    raise RuntimeError(
                        "another loop over this DALI loader started while this one was paused; "
                        "only the newest loop may continue"
                    )
            pipe.reset()
            self._unfinished = False
        finally:
            if self._owner is token:
                self._owner, feeder.feed = None, None

    def _fed_by_thread(self, pipe, token: object) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The loop of `_batches` with the pipeline driven from a thread of its own (see "Feed thread" above)."""
        feeder, done, stop = self._feeder, object(), threading.Event()
        batches: queue.Queue = queue.Queue(maxsize=2)
        consumer = torch.cuda.current_stream(self.device) if self._gpu else None

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    batches.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                with torch.cuda.device(self.device) if self._gpu else contextlib.nullcontext():
                    side = torch.cuda.Stream(self.device) if self._gpu else None
                    self._schedule(pipe)
                    while not stop.is_set():
                        try:
                            outputs = pipe.share_outputs(side) if side is not None else pipe.share_outputs()
                        except StopIteration:
                            pipe.reset()
                            self._unfinished = False
                            put(done)
                            return
                        except Exception as e:
                            failed = feeder.pending[0][1] if feeder.pending else np.zeros(0, np.int64)
                            self._discard_pipeline()
                            error = self.source.diagnose(failed, error_chain(e))
                            error.__cause__ = e
                            put(error)
                            return
                        feeder.pending.popleft()
                        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                            batch = self._to_torch(outputs)  # copies out of DALI's buffers, on `side`
                            ready = torch.cuda.Event() if side is not None else None
                            if ready is not None:
                                ready.record(side)
                        pipe.release_outputs()
                        self._schedule(pipe)  # the callback runs here, off the training thread
                        if not put((batch, ready)):
                            return
            except BaseException as e:  # a SampleError from the callback, anything else: the consumer raises it
                put(e)

        thread = threading.Thread(target=produce, name="dali-feed", daemon=True)
        thread.start()
        try:
            while True:
                item = batches.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                (images, labels), ready = item
                if ready is not None:
                    consumer.wait_event(ready)  # the copies are done before the step reads them; no host wait
                    images.record_stream(consumer)  # made on the feed stream, used on this one
                    labels.record_stream(consumer)
                yield images, labels
                if self._owner is not token:
                    raise RuntimeError(
                        "another loop over this DALI loader started while this one was paused; "
                        "only the newest loop may continue"
                    )
        finally:
            stop.set()
            thread.join()  # it ends within one batch; the pipeline is this thread's again

    def _schedule(self, pipe) -> None:
        """Queue the next batch (the callback runs here: its SampleError names a sample). After any error the
        pipeline is dropped and the next loop builds a fresh one."""
        try:
            pipe.schedule_run()
        except BaseException:
            self._discard_pipeline()
            raise
