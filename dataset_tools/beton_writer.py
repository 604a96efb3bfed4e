"""Write (image path, label) lists to an FFCV .beton, skipping files that are not images instead of dying on them.

FFCV's DatasetWriter fixes the sample count before it starts and has no way to drop a sample, so one unreadable file
in 1.28 M ends the run (and a crashed worker leaves its main loop waiting forever). This writer keeps FFCV's on-disk
format and its fast parts -- worker processes writing pages straight into the file through FFCV's MemoryAllocator,
metadata in shared memory -- and changes three things:

* each worker decodes with `files.load_rgb` (odd formats to RGB, DCT-domain downscaling of big JPEGs) and records a
  reason for every file it cannot use;
* at the end the metadata rows of skipped files are dropped and the allocation table renumbered, so the .beton holds
  exactly the valid images, in the input order;
* the JPEG-or-raw choice of FFCV's 'proportion' mode is drawn from `seed`, not from each worker's unseeded
  np.random, so a conversion is reproducible.

The caller gives a temporary path; `dataset_tools.convert` renames it when everything succeeded.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import queue
import time
from dataclasses import dataclass, field

import numpy as np

from dataset_tools.files import BadImage, load_rgb, turbojpeg_decoder

PAGE_SIZE = 1 << 23  # 8 MiB, FFCV's default: holds one raw 1600 x 1600 image
STALL_SECONDS = 600  # one chunk of images never takes this long; a silent worker is hung, not slow


@contextlib.contextmanager
def single_threaded_opencv():
    """fork() copies a process but not its threads: a child that finds OpenCV's thread pool initialised (by any
    earlier cv2 call in the parent) can hang forever on the pool's locks. With one OpenCV thread while forking, no
    pool exists to inherit, and the workers -- one per core already -- run OpenCV single-threaded, as they should."""
    try:
        import cv2
    except ImportError:
        yield
        return
    previous = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(previous)


@dataclass
class WriteResult:
    written: int
    skipped: list[dict] = field(default_factory=list)  # [{"path": ..., "reason": ...}]
    seconds: float = 0.0


class WriterError(RuntimeError):
    pass


def _page_size_for(max_side: int | None) -> int:
    if not max_side:
        return 1 << 27  # no resize: room for a raw ~6,000 x 7,000 image
    need = 3 * max_side * max_side + 1024
    size = PAGE_SIZE
    while size < need:
        size <<= 1
    return size


def _worker(tasks, metadata_sm, metadata_type, allocator, done, results, params, parent_pid):
    """Runs in a forked process: decode, encode into the file via the shared allocator, report failures.

    Puts ("ok", allocations, failures) on `results`, or ("error", message) when the file cannot be written (a full
    or read-only disk): the parent names that cause instead of 'a writer process died'."""
    from ffcv.fields import IntField, RGBImageField

    from dataset_tools.processes import exit_with_parent

    exit_with_parent(parent_pid)  # the converter was killed: stop, don't write on into an orphan file
    max_side, quality = params
    jpg = RGBImageField(write_mode="jpg", jpeg_quality=quality)
    raw = RGBImageField(write_mode="raw")
    labels = IntField()
    decoder = turbojpeg_decoder()
    metadata = np.frombuffer(metadata_sm.buf, dtype=metadata_type)
    image_col, label_col = metadata_type.names  # FFCV names the metadata columns by position ('f0', 'f1')
    failures = []
    try:
        with allocator:
            while True:
                try:
                    chunk = tasks.get(timeout=1.0)
                except queue.Empty:
                    continue
                if chunk is None:
                    break
                for dest, path, label, as_jpeg in chunk:
                    try:
                        image = load_rgb(path, max_side, decoder)
                    except BadImage as e:
                        failures.append((dest, path, str(e)))
                        continue
                    except Exception as e:  # a decoder bug must cost one image, not the run
                        failures.append((dest, path, f"undecodable: {type(e).__name__}: {e}"))
                        continue
                    row = metadata[dest : dest + 1]
                    for attempt in range(2):  # FFCV's protocol: a sample that straddles a page is retried on a new page
                        try:
                            allocator.set_current_sample(dest)
                            (jpg if as_jpeg else raw).encode(row[image_col], image, allocator.malloc)
                            labels.encode(row[label_col], label, allocator.malloc)
                            break
                        except MemoryError:
                            if attempt == 1:
                                raise
                with done.get_lock():
                    done.value += len(chunk)
    except OSError as e:
        results.put(("error", f"cannot write {allocator.fname} ({e.strerror or e})"))
        return
    results.put(("ok", allocator.allocations, failures))


def write_beton(
    path: str,
    items: list[tuple[str, int]],
    *,
    max_side: int | None = 500,
    jpeg_quality: int = 90,
    compress_prob: float = 0.5,
    workers: int = 1,
    seed: int = 0,
    chunk_size: int = 64,
    desc: str = "convert",
    progress: bool = True,
) -> WriteResult:
    """Write `items` [(image path, label)] to `path` (overwritten). Returns what was written and what was skipped."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.types import ALLOC_TABLE_TYPE
    from ffcv.writer import DatasetWriter

    from dataset_tools.progress import progress as progress_bar

    n = len(items)
    if n == 0:
        raise WriterError("nothing to write")
    workers = max(1, min(workers, (n + chunk_size - 1) // chunk_size))
    t0 = time.perf_counter()

    # FFCV's own header, field descriptors and shared-memory metadata; only the sample loop and finalize are ours.
    fields = {"image": RGBImageField(write_mode="jpg", jpeg_quality=jpeg_quality), "label": IntField()}
    writer = DatasetWriter(path, fields, page_size=_page_size_for(max_side), num_workers=workers)
    writer.num_samples = n
    writer.prepare()
    try:
        as_jpeg = np.random.default_rng(seed).random(n) < compress_prob
        ctx = mp.get_context("fork")  # workers inherit the shared-memory mapping and allocator counters
        tasks, results = ctx.Queue(), ctx.Queue()
        for start in range(0, n, chunk_size):
            tasks.put(
                [(i, items[i][0], int(items[i][1]), bool(as_jpeg[i])) for i in range(start, min(n, start + chunk_size))]
            )
        for _ in range(workers):
            tasks.put(None)
        done = ctx.Value(ctypes.c_uint64, 0)
        allocator = MemoryAllocator(path, writer.data_region_start, writer.page_size)
        args = (
            tasks,
            writer.metadata_sm,
            writer.metadata_type,
            allocator,
            done,
            results,
            (max_side, jpeg_quality),
            os.getpid(),
        )
        procs = [ctx.Process(target=_worker, args=args, daemon=True) for _ in range(workers)]
        with single_threaded_opencv():
            for p in procs:
                p.start()

        bar = progress_bar(n, desc, "img", disable=not progress, smoothing=0.05, dynamic_ncols=True)
        allocations, failures, shown, received = [], [], 0, 0
        all_exited_at, last_progress = None, time.monotonic()
        try:
            while received < len(procs):
                try:  # drain results before joining: a worker cannot exit while its result sits in the pipe
                    result = results.get(timeout=0.2)
                except queue.Empty:
                    result = None
                if result is not None:
                    if result[0] == "error":
                        raise WriterError(f"{result[1]}; the partial file is discarded")
                    allocations.extend(result[1])
                    failures.extend(result[2])
                    received += 1
                if done.value > shown:
                    bar.update(done.value - shown)
                    shown, last_progress = done.value, time.monotonic()
                elif time.monotonic() - last_progress > STALL_SECONDS:
                    raise WriterError(
                        f"no image finished for {STALL_SECONDS // 60} minutes: a writer process is "
                        "stuck; the partial file is discarded"
                    )
                crashed = [p for p in procs if p.exitcode not in (0, None)]
                if crashed:
                    raise WriterError(
                        f"a writer process died (exit code {crashed[0].exitcode}); the partial file is discarded"
                    )
                if all(p.exitcode == 0 for p in procs):
                    all_exited_at = all_exited_at or time.monotonic()
                    if time.monotonic() - all_exited_at > 10:
                        raise WriterError("writer processes exited without reporting their results")
        finally:
            bar.close()
            for p in procs:
                if p.is_alive():
                    p.terminate()
                p.join()

        if done.value != n:
            raise WriterError(f"writers finished {done.value} of {n} images")

        # Drop the rows of skipped files; renumber the allocation table to the kept rows.
        metadata = np.frombuffer(writer.metadata_sm.buf, dtype=writer.metadata_type)
        keep = np.ones(n, dtype=bool)
        keep[[dest for dest, _, _ in failures]] = False
        new_index = np.cumsum(keep) - 1
        kept = metadata[keep].copy()
        del metadata
        table = np.array(allocations, dtype=ALLOC_TABLE_TYPE) if allocations else np.zeros(0, ALLOC_TABLE_TYPE)
        table = table[keep[table["sample_id"].astype(np.int64)]] if len(table) else table
        table["sample_id"] = new_index[table["sample_id"].astype(np.int64)]
        with open(path, "r+b") as fp:
            fp.seek(writer.metadata_start)
            fp.write(kept.tobytes())
            fp.seek(0, os.SEEK_END)
            writer.header["alloc_table_ptr"] = fp.tell()
            fp.write(table.tobytes())
            writer.header["num_samples"] = int(keep.sum())
            fp.seek(0)
            fp.write(writer.header.tobytes())
            fp.flush()
            os.fsync(fp.fileno())
    finally:
        writer.metadata_sm.close()
        writer.metadata_sm.unlink()

    skipped = [{"path": p, "reason": r} for _, p, r in sorted(failures)]
    return WriteResult(written=int(keep.sum()), skipped=skipped, seconds=time.perf_counter() - t0)
