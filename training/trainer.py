"""The training loop: `train(cfg)` sets up a Run (training.setup), then epochs of train -> validate -> checkpoint ->
log. `rn50 train` and `torchrun -m training` call it once the config has passed the cheap checks in training.train.

Resume is exact at any optimizer step: the loader position, the epoch's running sums and the whole training state go
into mid-epoch checkpoints (training.checkpoint.Position describes the phases); everything random in a step is a pure
function of (seed, epoch, sample or batch index, rank), so nothing drawn before the kill needs replaying.

A stop signal (training.signals) travels like this: the handler records it; after the current optimizer step
`train_epoch` asks `Run.control` (all ranks agree), writes the mid-epoch checkpoint and ends the epoch early; `fit`
sees the unfinished epoch and returns 128 + the signal number, with one line saying how to continue.
"""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path

import torch

from dataset_tools.files import DataFolderError
from pipeline.contract import LoaderError, SampleError
from pipeline.torchvision_loader import lost_worker
from training.checkpoint import Position
from training.config import TrainConfig
from training.distributed import DeviceError, cleanup, init_distributed
from training.engine import EpochStats, Meter, NonFiniteLoss, check_finite, evaluate, micro_batches, train_step
from training.run import Run, SetupError, WriteError, log0
from training.setup import setup
from training.signals import StopSignals, StopWhileWaiting

DATA_ERRORS = (DataFolderError, SampleError, LoaderError)


def train(cfg: TrainConfig, flags: list[str]) -> int:
    """Train as `cfg` says; returns the exit code. `flags`: the command line, for the run header."""
    try:
        ctx = init_distributed(cfg.device)
    except DeviceError as e:
        print(f"rn50 train: error: {e}", flush=True)
        return 2
    previous = make_deterministic(ctx.device) if cfg.deterministic else None
    try:
        with StopSignals() as signals:
            run = setup(cfg, ctx, signals, flags)
            try:
                return fit(run)
            finally:
                run.close()
    except SetupError as e:
        log0(ctx, f"rn50 train: error: {e}")
        return 2
    except (NonFiniteLoss, WriteError) as e:
        log0(ctx, f"rn50 train: error: {e}")
        return 1
    except DATA_ERRORS as e:
        # a folder or a sample the loader cannot read: one line naming it, from the rank that met it
        print(f"rn50 train: error: {e}", flush=True)
        return 2
    except RuntimeError as e:
        failure = lost_worker(e)  # a dead DataLoader worker is reported wherever the step happens to be
        if failure is None:
            raise
        print(f"rn50 train: error: {failure}", flush=True)
        return 2
    except KeyboardInterrupt:
        log0(ctx, "rn50 train: interrupted; the latest checkpoint is intact (--resume continues from it)")
        return 130
    finally:
        if previous is not None:
            torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        cleanup()


def fit(run: Run) -> int:
    """The epochs, from where the run starts (a resumed run may first owe an epoch its validation)."""
    cfg, start = run.cfg, run.position
    if start.validate_first is not None:
        stopped = validate_and_save(run, start.validate_first, start.pending, saved_before=True)
        if stopped is not None:
            return stopped
        if start.validate_first == cfg.stop_after_epoch:
            return stop_after(run, start.validate_first)
    for epoch in range(start.epoch, cfg.epochs):
        if run.control.stop_requested():  # arrived between epochs: the latest checkpoint already holds everything
            return run.stopped(Position(epoch=epoch, batch=0, step=epoch * run.steps_per_epoch))
        stats = train_epoch(run, epoch)
        if not stats.completed:  # a stop signal: the step boundary wrote the mid-epoch checkpoint
            return run.stopped(run.last_saved)
        stopped = validate_and_save(run, epoch, stats)
        if stopped is not None:
            return stopped
        if epoch == cfg.stop_after_epoch:
            return stop_after(run, epoch)
    return finish(run)


def train_epoch(run: Run, epoch: int) -> EpochStats:
    """One epoch of training (from the resumed batch in the epoch a mid-epoch checkpoint was taken in). After every
    optimizer step: meter it; at the end of a log window, log it (the loop's one sync point); write a mid-epoch
    checkpoint when one is due; stop when a signal asks. The ranks agree on saving and stopping (`Run.control`)."""
    cfg, parts, spe = run.cfg, run.parts, run.steps_per_epoch
    first_batch, resumed = run.resume_point(epoch)
    resolution = run.resolution(epoch)
    run.train_loader.set_resolution(resolution)
    run.train_loader.set_epoch(epoch, first_batch)
    parts.model.train()
    steps = range(epoch * spe + first_batch // cfg.grad_accum, (epoch + 1) * spe)  # global optimizer steps
    meter = Meter(run.ctx, parts.schedule.lr_at(steps.start), resumed)
    bar = progress_bar(run, epoch, steps.start - epoch * spe)
    source = iter(run.train_loader)
    waited = run.control.signals.waiting(source)  # a stop during a wait for a stuck loader ends the wait
    groups = micro_batches(meter.timed(waited), cfg.grad_accum, run.augment, epoch=epoch, first_batch=first_batch)
    stop = done = 0
    try:
        for step, micro in zip(steps, groups):
            t0 = time.perf_counter()
            meter.add(*train_step(parts, micro, step, run.ctx.device), seconds=time.perf_counter() - t0)
            done = step + 1 - epoch * spe  # steps of this epoch done
            if bar is not None:
                bar.update(1)
            if (step + 1) % cfg.log_every == 0 or done == spe:
                log_window(run, bar, epoch, step + 1, meter.close_window())
            stop, save = run.control.save_due(done)
            if save and done < spe:  # at the epoch's end, the save before validation holds what this one would
                run.save(run.mid_epoch_position(epoch, done, meter.snapshot()))
            if stop:
                break
    except StopWhileWaiting as e:  # the loader gave no batch within the grace: the last checkpoint stands
        stop = run.control.stop_signal = e.signum
        log0(run.ctx, f"rn50 train: {e}: the loader is stuck, so no checkpoint is written now")
        done = -1  # the epoch did not finish
    if hasattr(source, "close"):
        source.close()  # an epoch cut short of the loader's end releases the backend's iterator now
    if bar is not None:
        bar.close()
    stats = meter.result(completed=not stop or done == spe)
    run.note_warm_up(resolution, stats.first_step_s)
    return stats


def progress_bar(run: Run, epoch: int, done: int):
    """The epoch's progress on rank 0 (--progress), starting at `done` steps: tqdm's bar on a terminal, a plain line
    every 30 s in a log file; None otherwise."""
    if not (run.cfg.progress and run.ctx.is_main):
        return None
    from dataset_tools.progress import progress

    return progress(run.steps_per_epoch, f"epoch {epoch}", "step", initial=done, leave=True, dynamic_ncols=True)


def log_window(run: Run, bar, epoch: int, step: int, scalars: dict[str, float]) -> None:
    """A log window's numbers (all ranks'): checked, then to TensorBoard (rank 0) and the progress bar."""
    check_finite(scalars["loss"], epoch, step)
    if run.runlog is not None:
        run.runlog.step(step, scalars)
    if bar is not None:
        bar.set_postfix(
            loss=f"{scalars['loss']:.3f}",
            top1=f"{scalars['top1']:.1f}",
            lr=f"{scalars['lr']:.4g}",
            img_s=f"{scalars['images_per_s']:.0f}",
        )


def validate_and_save(run: Run, epoch: int, stats: EpochStats, saved_before: bool = False) -> int | None:
    """Validate a trained epoch (and its EMA), then write its checkpoint files and log line. With mid-epoch
    checkpoints on, or a stop pending, the state before validation is saved first, so a kill during validation
    costs the validation only. Returns the exit code if a stop ended it, else None."""
    control = run.control
    t_val = time.perf_counter()
    run.sync_buffers()
    before = run.after_training(epoch, "before_validation", pending=stats)
    if (control.saves_mid_epoch or control.stop_signal) and not saved_before:
        run.save(before)
        saved_before = True
    if control.stop_signal:
        return run.stopped(before)
    try:
        val, ema_val = validate(run, epoch)
    except DATA_ERRORS:  # the val images cannot be read: keep the trained epoch (one process: no collective)
        if not saved_before and not run.ctx.distributed:
            run.save(before)
        raise
    if val is None or (run.parts.ema is not None and ema_val is None):  # a stop arrived during validation
        if not saved_before:
            run.save(before)
        return run.stopped(before)
    record = epoch_record(run, epoch, stats, val, ema_val, time.perf_counter() - t_val)
    is_best = val["top1"] > run.best_top1
    run.best_top1 = max(run.best_top1, val["top1"])
    run.save_epoch(epoch, record, is_best)
    ema_txt = f", EMA top-1 {ema_val['top1']:.2f}" if ema_val else ""
    log0(
        run.ctx,
        f"epoch {epoch}: train loss {stats.loss:.4f}, val loss {val['loss']:.4f}, top-1 {val['top1']:.2f}%, "
        f"top-5 {val['top5']:.2f}%{ema_txt}, {record['res']} px, {record['epoch_time_s']:.1f} s, "
        f"{stats.images_per_s:.0f} img/s, data wait {stats.data_wait_pct:.0f}%",
    )
    return None


def validate(run: Run, epoch: int) -> tuple[dict | None, dict | None]:
    """(the model's, the EMA's) validation results; None where a stop arrived during it (or no EMA is kept)."""
    should_stop, tta = run.control.stop_requested, run.cfg.tta
    static_shapes = run.parts.step_mode != "eager"
    val = evaluate(
        run.eval_model,
        run.val_loader,
        run.precision,
        run.ctx,
        tta=tta,
        epoch=epoch,
        should_stop=should_stop,
        static_shapes=static_shapes,
    )
    if val is None or run.parts.ema is None:
        return val, None
    ema = evaluate(
        run.parts.ema.module, run.val_loader, run.precision, run.ctx, tta=tta, epoch=epoch, should_stop=should_stop
    )
    return val, ema


def epoch_record(run: Run, epoch: int, stats: EpochStats, val: dict, ema_val: dict | None, val_s: float) -> dict:
    """The epoch's line of the training log (and of every checkpoint written after it)."""
    return {
        "epoch": epoch,
        "train_loss": stats.loss,
        "train_top1": stats.top1,
        "val_loss": val["loss"],
        "val_top1": val["top1"],
        "val_top5": val["top5"],
        "ema_top1": ema_val["top1"] if ema_val else None,
        "lr": stats.lr,
        "res": run.resolution(epoch),
        "val_res": run.cfg.val_res,
        "epoch_time_s": stats.seconds + val_s,
        "train_time_s": stats.seconds,
        "images_per_s": stats.images_per_s,
        "data_wait_pct": stats.data_wait_pct,
        "step": (epoch + 1) * run.steps_per_epoch,
        "val_samples": val["samples"],
    }


def stop_after(run: Run, epoch: int) -> int:
    log0(
        run.ctx,
        f"stopping after epoch {epoch} as asked; continue with --run-name {shlex.quote(run.cfg.run_name)} --resume",
    )
    return finish(run)


def finish(run: Run) -> int:
    if run.runlog is not None:
        print(
            f"logs: {run.runlog.dir}/training_log.md (+ .json, loss.png, accuracy.png, lr.png)\n"
            f"TensorBoard: tensorboard --logdir {shlex.quote(str(Path(run.cfg.output_dir) / 'runs'))}\n"
            f"checkpoints: {run.ckpt_dir}",
            flush=True,
        )
    return 0


def make_deterministic(device: torch.device) -> tuple[bool, bool]:
    """--deterministic: deterministic kernels everywhere; returns the previous (enabled, warn_only) to restore.

    On CUDA, cuBLAS needs a fixed workspace (CUBLAS_WORKSPACE_CONFIG, read when its handle is created, i.e. before
    the first matmul) and cuDNN must not autotune: cudnn.benchmark times kernels in each process and may pick other
    ones after a restart, so a resumed run would end with other weights (what was measured: README, "Resume").
    torch lists kernels ResNet needs as nondeterministic on CUDA (adaptive average pooling's backward), so there it
    only warns: on a GPU, bit-identity is measured on one device, not promised (other GPUs, NCCL's reduction order
    under DDP); position and state resume exactly either way."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    return previous
