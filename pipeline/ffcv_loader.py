"""The FFCV backend (primary): train.beton/val.beton decoded by FFCV's compiled pipeline on `workers` threads.

What is ours and why:
- Order: a custom `TraversalOrder` that returns this rank's slice of `pipeline.order.plan_epoch`, instead of FFCV's
  RANDOM (torch DistributedSampler inside) or QUASI_RANDOM (refuses distributed=True). `start_batch` slices it.
- Train crops: `KeyedResizedCrop` decodes, cuts and flips with boxes we compute in Python from (seed, epoch, index)
  (`pipeline.crops`, the same function the torchvision backend uses). How the epoch reaches compiled code: numba
  freezes closure arrays as constants, so the boxes travel as an extra per-sample buffer of the decoder's allocated
  memory (shape (B, 5): top, left, h, w, flip), which FFCV passes to the compiled decoder as an argument; our
  EpochIterator fills it just before each batch runs. No recompilation per epoch; the boxes cost ~0.1 ms of numpy
  per 256 samples (computed 16 batches at a time), measured on this project's 2-core CPU.
- Val: FFCV's CenterCropRGBImageDecoder (centre square of side ratio * shorter side, as `center_crop_boxes`).
- Resolution: the decoders' `output_size` is read when FFCV allocates an epoch's buffers, so `set_resolution` needs
  no recompile (ffcv-imagenet's trick, checked by the tests).
- Device: FFCV stops at uint8 NHWC CPU tensors (pinned when CUDA exists); copy, normalisation and dtype happen in
  torch on the device (`contract.device_batches`), so FFCV's cupy-based NormalizeImage is never needed.

Caching (`os_cache`): True maps the file and lets the OS page cache hold it (best when the dataset fits in RAM, and
shared by all ranks of a machine). False uses FFCV's process cache, which reads only the pages a coming batch needs;
use it with order="quasi_random" for datasets bigger than RAM: our page-grouped order (pipeline.order) shuffles
pages, then samples within windows of 2 * batch_size pages, and under DDP gives each rank a contiguous block of it,
so ranks read disjoint pages (FFCV's own QUASI_RANDOM raises NotImplementedError with distributed=True).
Batches from a window are drawn from fewer pages than a full shuffle, so they are less random (ffcv issue #304).
The validation split is always read in file order, which is already page-friendly.

Threads: FFCV sets numba's *and torch's* intra-op thread count to `workers` (ffcv.pipeline.Compiler), in the process
that builds the loader.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numba
import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import IMAGE_MODES, CenterCropRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.loader import Loader as _FFCVBaseLoader
from ffcv.loader.epoch_iterator import EpochIterator
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.pipeline_spec import PipelineSpec
from ffcv.pipeline.state import State
from ffcv.transforms import ToTensor
from ffcv.traversal_order.base import TraversalOrder

from pipeline.contract import VAL_CROP_RATIO, Loader, device_batches
from pipeline.crops import random_resized_crop_boxes, sample_keys
from pipeline.folders import beton_classes
from pipeline.order import EpochPlan, page_grouped_order

PARAMS = 5  # per-sample crop parameters handed to the compiled decoder: top, left, h, w, flip


class KeyedResizedCrop(Operation):
    """Decode an RGBImageField, cut box (top, left, h, w), resize to `output_size`, flip if asked.

    Like FFCV's RandomResizedCropRGBImageDecoder, except that the box and flip come from a per-sample int64 buffer
    (the third allocation) that the caller fills before each batch, instead of numba's unseeded np.random."""

    def __init__(self, output_size: tuple[int, int]) -> None:
        super().__init__()
        self.output_size = output_size

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, tuple[AllocationQuery, ...]]:
        max_width = np.uint64(self.metadata["width"].max())
        max_height = np.uint64(self.metadata["height"].max())
        output_shape = (self.output_size[0], self.output_size[1], 3)
        u8 = np.dtype("<u1")
        return (replace(previous_state, jit_mode=True, shape=output_shape, dtype=u8),
                (AllocationQuery(output_shape, u8),
                 AllocationQuery((max_height * max_width * np.uint64(3),), u8),
                 AllocationQuery((PARAMS,), np.dtype("<i8"))))

    def generate_code(self) -> Callable:
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage, params = my_storage
            for dst_ix in my_range(len(batch_indices)):
                field = metadata[batch_indices[dst_ix]]
                image_data = mem_read(field["data_ptr"], storage_state)
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])
                if field["mode"] == jpg:
                    temp_buffer = temp_storage[dst_ix]
                    imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                    temp_buffer = temp_buffer.reshape(-1)[: 3 * height * width].reshape(height, width, 3)
                else:
                    temp_buffer = image_data.reshape(height, width, 3)
                top, left, h, w = params[dst_ix, 0], params[dst_ix, 1], params[dst_ix, 2], params[dst_ix, 3]
                out = destination[dst_ix]
                resize_crop_c(temp_buffer, top, top + h, left, left + w, out)
                if params[dst_ix, 4] != 0:
                    side = out.shape[1]
                    for y in range(out.shape[0]):
                        for x in range(side // 2):
                            for c in range(3):
                                v = out[y, x, c]
                                out[y, x, c] = out[y, side - 1 - x, c]
                                out[y, side - 1 - x, c] = v
            return destination[: len(batch_indices)]

        decode.is_parallel = True
        return decode


class PlannedOrder(TraversalOrder):
    """FFCV TraversalOrder that returns our plan. FFCV 1.0.2 calls `order(loader)` on a custom order *instance*,
    so the instance is callable and finishes its set-up there."""

    def __init__(self, indices_for_epoch: Callable[[int], np.ndarray]) -> None:
        self.indices_for_epoch = indices_for_epoch

    def __call__(self, loader) -> PlannedOrder:
        TraversalOrder.__init__(self, loader)
        return self

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.indices_for_epoch(epoch)


class _ParamsEpochIterator(EpochIterator):
    """FFCV's EpochIterator, filling the crop-parameter buffer of each batch slot before the batch is decoded, and
    handing the batch's samples to the decoding threads one at a time."""

    def __init__(self, loader, order, node_id: int | None, fill: Callable[[int, np.ndarray, np.ndarray], None] | None):
        self._node_id, self._fill = node_id, fill  # set before super().__init__, which starts the thread
        super().__init__(loader, order)

    def run(self) -> None:
        # FFCV decodes a batch as one numba prange over its samples, and numba by default gives each thread an equal
        # contiguous share. A JPEG sample costs several times a raw one, so equal shares finish at different times
        # and every batch waits for its slowest thread. Chunks of one sample let a free thread take the next sample.
        # The setting is per thread: this is the thread that launches the decoding. Measured on this project's
        # 2-core CPU (2 threads, 160 px, alternating runs): +6 to +29% img/s in 8 of 8 pairs at 16 samples per thread,
        # +5 and +8% at 128.
        numba.set_parallel_chunksize(1)
        super().run()

    def run_pipeline(self, b_ix, batch_indices, batch_slot, cuda_event):
        if self._fill is not None:
            params = self.memory_allocations["operation"][self._node_id][2][batch_slot][: len(batch_indices)]
            self._fill(b_ix, np.asarray(batch_indices), params)
        return super().run_pipeline(b_ix, batch_indices, batch_slot, cuda_event)


class _FFCVLoader(_FFCVBaseLoader):
    def epoch_iterator(self, order: np.ndarray, node_id: int | None, fill) -> EpochIterator:
        Compiler.set_num_threads(self.num_workers)
        if self.code is None or self.recompile:
            self.generate_code()
        return _ParamsEpochIterator(self, order, node_id, fill)


class FFCVLoader(Loader):
    backend = "ffcv"

    def __init__(self, data_dir: str | Path, *, split: str, batch_size: int, resolution: int, workers: int,
                 device: torch.device | str, dtype: torch.dtype, rank: int, world_size: int, seed: int,
                 drop_last: bool, scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 val_crop_ratio: float = VAL_CROP_RATIO, os_cache: bool = True, order: str = "random",
                 batches_ahead: int = 3) -> None:
        from dataset_tools.beton_format import read_index

        data_dir = Path(data_dir)
        path = data_dir / f"{split}.beton"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; write it with rn50 convert --data-dir IMAGENET --out-dir "
                                    f"{data_dir}")
        if order not in ("random", "quasi_random"):
            raise ValueError(f"order must be random or quasi_random, got {order!r}")
        index = read_index(path)
        if "image" not in index.field_names or "label" not in index.field_names:
            raise ValueError(f"{path}: fields {index.field_names}, expected 'image' and 'label' (rn50 convert)")
        super().__init__(split=split, batch_size=batch_size, resolution=resolution, num_samples=index.num_samples,
                         classes=beton_classes(data_dir), drop_last=drop_last, rank=rank, world_size=world_size,
                         seed=seed, device=device, dtype=dtype)
        self.path, self.workers, self.os_cache, self.order = path, int(workers), bool(os_cache), order
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        image_meta = index.metadata[f"f{index.field_names.index('image')}"]
        self._heights = image_meta["height"].astype(np.int64)
        self._widths = image_meta["width"].astype(np.int64)
        self._sample_pages = None
        if order == "quasi_random" and self.shuffle:
            alloc = index.alloc_table
            pages = np.full(index.num_samples, np.iinfo(np.int64).max, np.int64)
            # a sample may span pages (or own several allocations): group it by the first page it touches
            np.minimum.at(pages, alloc["sample_id"].astype(np.int64), (alloc["ptr"] // index.page_size).astype(np.int64))
            self._sample_pages = pages

        size = (self.resolution, self.resolution)
        self._decoder = KeyedResizedCrop(size) if self.shuffle else CenterCropRGBImageDecoder(size, val_crop_ratio)
        pipelines = {name: None for name in index.field_names}
        pipelines["image"] = PipelineSpec("image", decoder=self._decoder, transforms=[ToTensor()])
        pipelines["label"] = PipelineSpec("label", decoder=IntDecoder(), transforms=[ToTensor()])
        self._ffcv = _FFCVLoader(str(path), batch_size=self.batch_size, num_workers=self.workers, os_cache=os_cache,
                                 order=PlannedOrder(lambda epoch: self.plan(epoch).indices),
                                 drop_last=False, seed=self.seed, pipelines=pipelines, batches_ahead=batches_ahead)
        self._fields = list(self._ffcv.pipeline_specs)  # output order of FFCV's batches
        self._node_id = self._ffcv.graph.operation_to_node[self._decoder][0].id

    def _make_plan(self, epoch: int) -> EpochPlan:
        if self._sample_pages is None:
            return super()._make_plan(epoch)
        order = page_grouped_order(self._sample_pages, self.seed, epoch, window_pages=2 * self.batch_size)
        return super()._make_plan(epoch, order=order, shard="block")

    def _crop_filler(self, epoch: int, order: np.ndarray) -> Callable[[int, np.ndarray, np.ndarray], None]:
        """fill(b_ix, indices, params) writes batch b_ix's boxes and flips. They are computed for 16 batches at a time:
        numpy's per-call overhead then costs ~0.1 ms per 256 samples instead of ~0.5 ms, on the thread that feeds
        FFCV's decoding threads."""
        heights, widths, seed, scale, ratio = self._heights, self._widths, self.seed, self.scale, self.ratio
        chunk = 16 * self.batch_size  # a whole number of batches, so no batch straddles two chunks
        cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

        def fill(b_ix: int, indices: np.ndarray, params: np.ndarray) -> None:
            first = b_ix * self.batch_size
            c = first // chunk
            if c not in cache:
                cache.clear()
                sel = order[c * chunk:(c + 1) * chunk].astype(np.int64)
                cache[c] = random_resized_crop_boxes(heights[sel], widths[sel], sample_keys(seed, epoch, sel),
                                                     scale, ratio)
            boxes, flips = cache[c]
            off = first - c * chunk
            params[:, :4] = boxes[off:off + len(indices)]
            params[:, 4] = flips[off:off + len(indices)]

        return fill

    def _batches(self, plan: EpochPlan, start_batch: int, resolution: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._decoder.output_size = (resolution, resolution)
        order = plan.indices[start_batch * self.batch_size:].astype(np.uint64)
        if len(order) == 0:  # resumed at the very end of an epoch
            return
        fill = self._crop_filler(self.epoch, order) if self.shuffle else None
        it = self._ffcv.epoch_iterator(order, self._node_id, fill)
        image_at, label_at = self._fields.index("image"), self._fields.index("label")
        try:
            pairs = ((batch[image_at], batch[label_at].view(-1)) for batch in it)
            yield from device_batches(pairs, self.device, self.dtype, source_reuses_buffers=True)
        finally:
            it.close()
