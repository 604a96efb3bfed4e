"""Every backend honours the loader contract, checked on coded images whose colour names the sample and label."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from _pipeline_helpers import colour_error, epoch_ids, sample_ids
from conftest import CODED_CLASSES, CODED_TRAIN_PER_CLASS, CODED_VAL_PER_CLASS, requires_dali, requires_ffcv

from pipeline import DALIOptions, LoaderOptions, Placement, build_loader

N_TRAIN = CODED_CLASSES * CODED_TRAIN_PER_CLASS  # 48
N_VAL = CODED_CLASSES * CODED_VAL_PER_CLASS  # 16
BACKENDS = [
    pytest.param("torchvision"),
    pytest.param("ffcv", marks=requires_ffcv),
    pytest.param("dali", marks=requires_dali),  # from the image folders
    pytest.param("dali-beton", marks=[requires_dali, requires_ffcv]),  # half the samples raw (the default)
    pytest.param("dali-beton-jpeg", marks=[requires_dali, requires_ffcv]),
]  # all JPEG (--compress-prob 1)
# which data each parameter reads, and the backend and DALI source it asks for
DATA = {
    "torchvision": ("coded_root", "torchvision", "auto"),
    "ffcv": ("coded_betons", "ffcv", "auto"),
    "dali": ("coded_root", "dali", "auto"),
    "dali-beton": ("coded_betons", "dali", "beton"),
    "dali-beton-jpeg": ("coded_betons_jpeg", "dali", "beton"),
}


# Building an ffcv loader JIT-compiles its pipeline (seconds on 2 cores), so loaders with the same arguments are built
# once per module and handed out again with epoch and resolution reset; `copy` asks for a second, separate one.
_LOADERS: dict = {}

# numba's dispatcher finaliser raises KeyError at garbage collection when FFCV has compiled the same function twice
pytestmark = pytest.mark.filterwarnings("ignore:Exception ignored in.*finalize:pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(params=BACKENDS)
def make(request):
    fixture, backend, source = DATA[request.param]
    data_dir = request.getfixturevalue(fixture)
    options = LoaderOptions(backend, workers=0 if backend == "torchvision" else 2, dali=DALIOptions(source=source))

    def make_loader(copy: int = 0, dtype=torch.float32, rank: int = 0, world_size: int = 1, **kw):
        args = dict(split="train", batch_size=8, resolution=32, seed=0, verbose=False)
        args.update(kw)
        placement = Placement("cpu", dtype, rank, world_size)
        key = (str(data_dir), copy, placement, options, tuple(sorted((k, str(v)) for k, v in args.items())))
        if key not in _LOADERS:
            _LOADERS[key] = build_loader(data_dir, placement=placement, options=options, **args)
        loader = _LOADERS[key]
        loader.set_epoch(0)
        loader.set_resolution(args["resolution"])
        return loader

    make_loader.backend = backend
    return make_loader


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batches_have_contract_shape_dtype_layout(make, dtype):
    loader = make(dtype=dtype, resolution=40)
    assert loader.backend == make.backend
    assert (loader.split, loader.batch_size, loader.resolution) == ("train", 8, 40)
    assert loader.num_samples == N_TRAIN and loader.num_classes == CODED_CLASSES
    assert loader.classes == [f"n{i:08d}" for i in range(CODED_CLASSES)]
    batches = list(loader)
    assert len(batches) == len(loader) == N_TRAIN // 8
    for images, labels in batches:
        assert images.shape == (8, 3, 40, 40) and images.dtype == dtype and images.device.type == "cpu"
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert labels.shape == (8,) and labels.dtype == torch.int64
        assert 0 <= int(labels.min()) and int(labels.max()) < CODED_CLASSES


def test_labels_match_pixels_and_normalisation_is_imagenet(make):
    loader = make()
    seen = Counter()
    for images, labels in loader:
        ids = sample_ids(images)
        assert [label for label, _ in ids] == labels.tolist()
        assert colour_error(images, labels) < 8  # JPEG q95 of a flat colour, then crop/resize: a few levels
        seen.update(labels.tolist())
    assert set(seen) == set(range(CODED_CLASSES))


def test_same_seed_and_epoch_give_same_order_and_pixels(make):
    a, b = make(seed=3), make(copy=1, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(ya, yb)
        assert sample_ids(xa) == sample_ids(xb)
    a.set_epoch(2)
    first = epoch_ids(a)
    a.set_epoch(3)
    other_epoch = epoch_ids(a)
    other_seed = epoch_ids(make(seed=4))
    assert sorted(sum(first, [])) == sorted(sum(other_epoch, []))  # same samples ...
    assert first != other_epoch and first != other_seed  # ... in another order


def test_loop_to_the_end_moves_to_next_epoch(make):
    loader = make()
    assert loader.epoch == 0
    first = epoch_ids(loader)
    assert loader.epoch == 1
    second = epoch_ids(loader)
    loader.set_epoch(0)
    assert epoch_ids(loader) == first
    assert second != first


def test_two_ranks_get_disjoint_shards_with_equal_batch_counts(make):
    ranks = [make(rank=r, world_size=2, batch_size=6) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == N_TRAIN // 12
    ids = [sum(epoch_ids(loader), []) for loader in ranks]
    assert len(ids[0]) == len(ids[1]) == N_TRAIN // 2
    assert not set(ids[0]) & set(ids[1])
    assert len(set(ids[0]) | set(ids[1])) == N_TRAIN


def test_set_epoch_start_batch_resumes_without_repeats_or_gaps(make):
    loader = make()
    loader.set_epoch(5)
    full = epoch_ids(loader)
    loader.set_epoch(5, start_batch=4)
    tail = epoch_ids(loader)
    assert tail == full[4:]
    assert loader.epoch == 6
    loader.set_epoch(5, start_batch=len(loader))  # resumed right at the end of an epoch: nothing left
    assert list(loader) == [] and loader.epoch == 6
    with pytest.raises(ValueError, match="start_batch"):
        loader.set_epoch(0, start_batch=len(loader) + 1)


def test_set_resolution_changes_the_next_epoch(make):
    loader = make(resolution=32)
    images, _ = next(iter(loader))
    assert images.shape[-2:] == (32, 32)
    loader.set_resolution(48)
    assert loader.resolution == 48
    shapes = {tuple(images.shape) for images, _ in loader}
    assert shapes == {(8, 3, 48, 48)}


def test_val_reads_every_sample_once_in_order_with_a_short_last_batch(make):
    loader = make(split="val", batch_size=6, drop_last=False)
    assert len(loader) == 3
    batches = list(loader)
    assert [len(labels) for _, labels in batches] == [6, 6, 4]
    ids = sum((sample_ids(images) for images, _ in batches), [])
    assert ids == [(label, i) for label in range(CODED_CLASSES) for i in range(CODED_VAL_PER_CLASS)]
    assert epoch_ids(loader) == [sample_ids(images) for images, _ in batches]  # val is not shuffled


def test_val_on_three_ranks_counts_each_sample_once_after_masking_padding(make):
    counted = Counter()
    lengths = set()
    for rank in range(3):
        loader = make(split="val", batch_size=4, drop_last=False, rank=rank, world_size=3)
        lengths.add(len(loader))
        for b, (images, _) in enumerate(loader):
            counted.update(sample_ids(images)[: loader.num_valid(b)])
    assert lengths == {2}  # ceil(16 / 3) = 6 samples per rank -> 2 batches each
    assert sorted(counted) == [(label, i) for label in range(CODED_CLASSES) for i in range(CODED_VAL_PER_CLASS)]
    assert set(counted.values()) == {1}
