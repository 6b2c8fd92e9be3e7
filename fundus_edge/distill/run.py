"""``distill``: prepare the student's run from its teacher, then train it with the trainer.

Order of work (the run directory is checked first and changed only when the trainer starts)::

    teacher checkpoint --load_teacher--> Teacher (frozen; file name and SHA-256 recorded)
    labelled training split (+ unlabelled images) --compute_targets--> cached soft labels,
        class maps and attention on the student's grid (the teacher is then released)
    student: an Ensemble of one (or a few) registry members with pooled heads (exact CAM
        kernels); with distill.init auto/teacher and the student's members the teacher's
        leading ones, it starts from the teacher checkpoint (model.weights = the teacher)
    trainer (fundus_edge.trainer.train): the supervised loss on labelled rows, the mask term,
        plus the distillation objectives; the unlabelled rows come from the target source,
        which is the run's ExtraData
    every checkpoint the run writes: meta["distill"] = the teacher's record, the terms' weights
        and temperature, the number of unlabelled images
"""

from __future__ import annotations

from pathlib import Path

from fundus_edge.errors import UserError
from fundus_edge.log import get_logger

__all__ = ["distill", "student_grid"]

log = get_logger("distill")


def student_grid(cfg, label_names: list[str]) -> tuple[int, int]:
    """The map grid ``(h, w)`` of the student ``cfg`` describes (built at random init; one
    tiny forward pass)."""
    import copy

    import torch

    from fundus_edge.trainer.step import build_model

    probe = copy.deepcopy(cfg)
    probe.model.weights = "none"
    model = build_model(probe, label_names).eval()
    size = int(cfg.model.image_size)
    with torch.no_grad():
        cams = model(torch.zeros(1, 3, size, size))["cams"]
    return int(cams.shape[-2]), int(cams.shape[-1])


def _choose_init(cfg, section, teacher) -> str | None:
    """Point ``model.weights`` at the teacher when the student starts from it; returns the
    members that do (None: the student starts from ``model.weights`` as given)."""
    student = list(cfg.model.members)
    leading = list(teacher.config.members)[: len(student)]
    if section.init == "weights":
        return None
    if student != leading:
        if section.init == "teacher":
            raise UserError(
                f"distill.init teacher: the student's members ({', '.join(student)}) are not the "
                f"teacher's leading members ({', '.join(teacher.config.members)}); use --init "
                "auto or weights"
            )
        return None
    cfg.model.weights = str(teacher.path)
    return ", ".join(student)


class _StampTeacher:
    """Trainer callback: every checkpoint the run writes carries ``meta["distill"]``."""

    def __init__(self, run_dir: Path, record: dict) -> None:
        self.run_dir = run_dir
        self.record = record

    def on_epoch_end(self, epoch: int, record: dict, model) -> None:
        from fundus_edge.models.checkpoint import update_checkpoint_meta

        names = ["last.safetensors"] + (["best.safetensors"] if record.get("best") else [])
        for name in names:
            path = self.run_dir / name
            if path.is_file():
                update_checkpoint_meta(path, {"distill": self.record})


def distill(
    cfg,
    section,
    resume: bool = False,
    overwrite: bool = False,
    show_progress: bool | None = None,
    given=(),
    on_start=None,
    callbacks=(),
):
    """Distil a student from ``section.teacher`` as ``cfg`` (the student's training config) says.

    Args:
        cfg: the student's resolved :class:`~fundus_edge.config.TrainConfig`.
        section: the :class:`~fundus_edge.distill.config.DistillSection`.
        resume: continue the run in ``cfg.out`` (the teacher's targets are computed again:
            they are deterministic).
        overwrite: replace an existing run directory.
        show_progress: progress bars on/off (default: on a terminal).
        given: the dotted keys the user set (see :func:`fundus_edge.trainer.train`).
        on_start: passed to :func:`fundus_edge.trainer.train` (rank 0, the run directory made).
        callbacks: more trainer callbacks (experiment tracking), told after the teacher stamp.

    Returns:
        The trainer's :class:`~fundus_edge.trainer.RunResult`.

    Raises:
        UserError: a missing or unusable teacher, no data folder, labels that differ from the
            teacher's, a student without pooled heads, a run directory conflict, a bad
            unlabelled folder.
        DataError: an empty training or validation split.
    """
    from fundus_edge.distill.data import TeacherTargetSource, unlabelled_samples
    from fundus_edge.distill.objectives import build_objectives
    from fundus_edge.distill.targets import compute_targets
    from fundus_edge.distill.teacher import load_teacher
    from fundus_edge.torchdata import FundusTorchDataset
    from fundus_edge.trainer import resolve_device, train
    from fundus_edge.trainer.batches import open_data
    from fundus_edge.trainer.parts import use_channels_last
    from fundus_edge.trainer.state import check_run_dir

    run_dir = Path(cfg.out or Path("runs") / cfg.name)
    check_run_dir(run_dir, resume, overwrite)  # before minutes of teacher passes
    if cfg.model.member_head != "gap" or cfg.model.head != "average":
        raise UserError(
            "distill: the student needs pooled per-member heads (model.head average, "
            "model.member_head gap): its class maps are its exact 1x1 CAM kernels"
        )
    device = resolve_device(cfg.device)
    teacher = load_teacher(section.teacher, str(device))
    init = _choose_init(cfg, section, teacher)
    ds, train_samples, _ = open_data(cfg)  # the trainer's own opening: same samples, limit
    if list(ds.label_names) != teacher.label_names:
        raise UserError(
            f"--data {cfg.data.root}: labels {', '.join(ds.label_names)} differ from the teacher's "
            f"({', '.join(teacher.label_names)}); the student learns the teacher's labels"
        )
    extra: list = []
    if section.unlabelled:
        known = [s.path for split in ds.splits.values() for s in split]
        extra = unlabelled_samples(
            section.unlabelled,
            len(teacher.label_names),
            exclude=known,
            limit=section.unlabelled_limit,
        )
    grid = student_grid(cfg, teacher.label_names)
    log.info(
        "distill: teacher %s (%s, sha256 %s...); student %s, %dx%d maps, %s; %d labelled + %d "
        "unlabelled images",
        teacher.name,
        "+".join(teacher.config.members),
        teacher.sha256[:12],
        "+".join(cfg.model.members),
        *grid,
        f"starts from the teacher's {init}" if init else f"weights {cfg.model.weights}",
        len(train_samples),
        len(extra),
    )
    targets = compute_targets(
        teacher,
        train_samples + extra,
        grid,
        cfg.data.preprocess.to_dict(),
        section.targets_batch_size,
        str(device),
        show_progress,
        channels_last=use_channels_last(cfg.optim.memory_format, device),
    )
    record = {
        "teacher": teacher.record(),
        "temperature": section.temperature,
        "weights": {
            "soft": section.soft_weight,
            "maps": section.map_weight,
            "attention": section.attention_weight,
            "labels": 1.0,
            "mask": cfg.optim.loss.mask_weight,
        },
        "init": "teacher" if init else cfg.model.weights,
        "labelled_images": len(train_samples),
        "unlabelled_images": len(extra),
        "passes": 1 if cfg.enhance.op == "none" else 2,
    }
    attention_mode = cfg.enhance.attention
    del teacher  # its targets are cached; free its memory before the student trains
    d = cfg.data
    aug = d.augment
    size = int(cfg.model.image_size)
    unlabelled_ds, per_step = None, 0
    if extra:
        pre = d.preprocess
        labels = list(ds.label_names) if cfg.optim.loss.mask_weight > 0 else None
        unlabelled_ds = FundusTorchDataset(
            extra, pre, cfg.model.mean, cfg.model.std, aug, cfg.seed + 1, d.cache, labels
        )
        unlabelled_ds.preload(2)
        # Spread the unlabelled images over an epoch's steps in proportion to the labelled.
        per_step = max(1, round(d.batch_size * len(extra) / max(1, len(train_samples))))
    source = TeacherTargetSource(
        targets, len(train_samples), size, aug, cfg.seed, unlabelled_ds, per_step
    )
    objectives = build_objectives(section, source, attention_mode)
    return train(
        cfg,
        resume=resume,
        overwrite=overwrite,
        show_progress=show_progress,
        given=given,
        objectives=objectives,
        extra_data=source,
        on_start=on_start,
        callbacks=[_StampTeacher(run_dir, record), *callbacks],
    )
