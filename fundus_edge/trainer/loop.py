"""The epoch loop: train a run's epochs, validate and save after each."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from fundus_edge.config import TrainConfig, load_config, save_config
from fundus_edge.log import get_logger, progress
from fundus_edge.trainer import attention, state
from fundus_edge.trainer.batches import ExtraData
from fundus_edge.trainer.dist import init_distributed
from fundus_edge.trainer.optim import set_phase, train_mode
from fundus_edge.trainer.parts import Parts
from fundus_edge.trainer.state import Callback, Interrupt, RunResult, notify
from fundus_edge.trainer.step import Objective, take_step
from fundus_edge.trainer.validate import EpochStats, epoch_line

__all__ = ["train"]

log = get_logger("train")


def train(
    cfg: TrainConfig,
    resume: bool = False,
    overwrite: bool = False,
    show_progress: bool | None = None,
    given: Iterable[str] = (),
    on_start: Callable[[], None] | None = None,
    *,
    objectives: Sequence[Objective] = (),
    callbacks: Sequence[Callback] = (),
    extra_data: ExtraData | None = None,
) -> RunResult:
    """Train an ensemble as ``cfg`` says; write the run directory; return what happened.

    Args:
        cfg: the resolved configuration (``cfg.out`` or ``runs/<cfg.name>`` is the run dir).
        resume: continue the run in the run dir from its state file: the saved config wins,
            except the keys of ``RESUME_MAY_CHANGE`` (``optim.lr`` rescales the schedule
            from the next step on; ``data.root`` must hold the same training split).
        overwrite: replace an existing run dir.
        show_progress: progress bar on/off (default: on a terminal).
        given: the dotted keys the user set (recipe, options, ``--set``); on ``resume`` one
            that differs from the run's and may not change is refused instead of ignored.
        on_start: called (rank 0) once data, model and state are ready and the run directory
            is made: the point from which the run replaces what was there (an ablation
            clears its old table and other variants here).
        objectives: extra loss terms, each logged as ``train_<name>`` (see the package doc).
        callbacks: told about every finished epoch and the end (rank 0).
        extra_data: more rows for every training batch (see :class:`ExtraData`).

    Raises:
        UserError: bad options, run dir conflicts, missing data, CUDA requested but absent.
        NonFiniteLossError: the loss or gradient became NaN/inf (nothing of it was applied).
        KeyboardInterrupt: after Ctrl-C, once the resumable state is saved.
    """
    t_start, run_dir = time.time(), Path(cfg.out or Path("runs") / cfg.name)
    dist_ = init_distributed(cfg.device)
    if dist_.main:  # other ranks could see the directory rank 0 is about to make
        state.check_run_dir(run_dir, resume, overwrite)
    if resume:
        cfg = state.resumed_config(cfg, load_config(run_dir / state.RUN_MARKER), given, run_dir)
    cfg.out, o = str(run_dir), cfg.optim
    cfg.validate()
    if dist_.main and o.freeze_epochs >= cfg.epochs:
        log.warning(
            "optim.freeze_epochs=%d >= epochs=%d: the backbone stays frozen the whole run "
            "(only the heads train)",
            o.freeze_epochs,
            cfg.epochs,
        )
    state.seed_everything(cfg.seed, cfg.deterministic)
    p = Parts.build(cfg, dist_, run_dir, resume, objectives)
    p.extra, p.callbacks = extra_data, callbacks if dist_.main else ()
    p.bar_off = None if show_progress is None else not show_progress
    if dist_.main:
        state.make_run_dir(run_dir, resume)
        save_config(cfg, run_dir / state.RUN_MARKER)
        if on_start is not None:
            on_start()
    dist_.barrier()
    enhanced, plain = attention.from_config(cfg.enhance), attention.NoAttention()
    module, module_frozen, run = p.step, None, p.state
    with Interrupt() as interrupt:
        for epoch in range(run.epoch, min(cfg.epochs, cfg.stop_after or cfg.epochs)):
            frozen = epoch < o.freeze_epochs
            p.step.attention = enhanced if epoch >= cfg.enhance.warmup_epochs else plain
            if frozen != module_frozen:  # DDP registers the parameters that train when built
                set_phase(p.step.ensemble, frozen)
                module, module_frozen = dist_.wrap(p.step), frozen
            _end_epoch(p, epoch, _train_epoch(p, epoch, frozen, module, interrupt))
    if dist_.main and run.history:
        from fundus_edge.plots import plot_training_curves

        plot_training_curves(run.history, run_dir / "training_curves.png")
    dist_.barrier()
    stopped = cfg.stop_after is not None and max(run.epoch, cfg.stop_after) < cfg.epochs
    bs, skipped = p.effective_batch_size, p.data.skips.total
    result = run.result(dist_.rank, cfg.select, t_start, bs, skipped, stopped)
    notify(p.callbacks, "on_train_end", result)
    return result


def _train_epoch(p: Parts, epoch: int, frozen: bool, module, interrupt) -> EpochStats:
    """One pass over the training split (from the saved step when resuming mid-epoch)."""
    run, dist_, t0 = p.state, p.dist, time.time()
    train_mode(p.step.ensemble, frozen)
    first = run.begin_epoch(epoch)
    loader = p.data.loader(epoch, first)
    p.data.skips.epoch = 0
    batches = iter(loader)  # draws a base seed from the torch RNG: before any restore
    if first and run.resume_rng is not None:
        state.set_rng_state(run.resume_rng)  # mid-epoch: continue the interrupted draws
    restore = functools.partial(train_mode, p.step.ensemble, frozen)
    title = f"epoch {epoch + 1}/{p.cfg.epochs}"
    for step, loaded in enumerate(progress(batches, len(loader), title, p.bar_off), first):
        batch, weight = p.data.batch(loaded), 1.0
        if batch is None and dist_.enabled:  # every rank must join the gradient all-reduce
            batch, weight = p.data.fallback(loaded), 0.0
        p.schedule.apply(p.opt.optimizer, run.global_step)
        if batch is not None:
            more = p.extra.batch(epoch, step) if p.extra is not None else None
            batch = (batch if more is None else batch.cat(more)).to(dist_.device)
            fail = functools.partial(p.non_finite, epoch=epoch, step=step)
            kw = {"restore_mode": restore, "agree": dist_.all_true, "fail": fail}
            values = take_step(module, p.step, batch, p.opt, weight=weight, **kw)
            run.sums.add(values, len(batch), weight)
        run.global_step += 1
        if dist_.any_true(interrupt.flag):
            if dist_.main:
                run.save(epoch, step + 1, p.step.ensemble, p.opt, p.schedule)
                log.warning(
                    "interrupted at epoch %d step %d: state saved to %s; continue with --resume",
                    epoch + 1,
                    step + 1,
                    run.path,
                )
            raise KeyboardInterrupt
    names = p.step.term_names
    sums = [run.sums.loss, float(run.sums.count), float(p.data.skips.epoch)]
    sums = dist_.sum(sums + [run.sums.terms.get(k, 0.0) for k in names])
    n = max(sums[1], 1)
    terms = {k: v / n for k, v in zip(names, sums[3:], strict=True)}
    return EpochStats(sums[0] / n, terms, int(sums[2]), frozen, p.step.attention.enhances, t0)


def _end_epoch(p: Parts, epoch: int, stats: EpochStats) -> None:
    """Rank 0: validate, record, save state, checkpoints and the metrics log."""
    if p.dist.main:
        rec, score, rep, thr = p.validation(p.opt.eval_model, epoch, stats, p.opt.lr)
        p.state.end_epoch(rec, score, p.opt, p.schedule, thr.tolist(), rep["per_label"], p.meta)
        log.info(epoch_line(rec, p.cfg.epochs))
        notify(p.callbacks, "on_epoch_end", rec["epoch"], rec, p.opt.eval_model)
    p.dist.barrier()
