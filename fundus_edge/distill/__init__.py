"""Knowledge distillation: a compact student (one registry member with CAM kernels) learns a
trained ensemble's soft labels, class maps and attention, plus the ground truth.

====================  ==========================================================================
``config.py``         :class:`DistillSection` (the recipe's ``distill:`` section) and
                      :func:`load_distill_config` (teacher defaults <- recipe <- options)
``teacher.py``        :func:`load_teacher`: the frozen teacher and its record (name, SHA-256)
``targets.py``        :func:`compute_targets`: the teacher's soft labels, maps and attention,
                      cached once per image; :func:`augment_maps` moves them with augmentation
``losses.py``         the terms: temperature-scaled soft labels, class maps, attention
``objectives.py``     the terms as trainer objectives (:mod:`fundus_edge.trainer`)
``data.py``           unlabelled images; :class:`TeacherTargetSource` (targets per batch row,
                      the unlabelled rows: the run's extra data)
``run.py``            :func:`distill`: the teacher's targets, then :func:`fundus_edge.trainer.train`
====================  ==========================================================================

The student is an ordinary :class:`~fundus_edge.models.Ensemble`, so ``export``, ``run``,
``eval`` and ``bench`` take its checkpoint as they take the ensemble's; the checkpoint's
``meta["distill"]`` names its teacher.
"""

from __future__ import annotations

from fundus_edge.distill.config import DistillSection, load_distill_config, student_defaults
from fundus_edge.distill.run import distill
from fundus_edge.distill.teacher import Teacher, load_teacher

__all__ = [
    "DistillSection",
    "Teacher",
    "distill",
    "load_distill_config",
    "load_teacher",
    "student_defaults",
]
