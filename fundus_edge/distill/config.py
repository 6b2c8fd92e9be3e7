"""The distillation recipe: a training recipe (:class:`~fundus_edge.config.TrainConfig`) for the
student plus a ``distill:`` section (:class:`DistillSection`).

Layers, each overriding the one before: the dataclass defaults, the student defaults taken
from the teacher (:func:`student_defaults`: its input size, normalisation, pooled heads, its
attention mode), the YAML recipe, ``--set KEY=VALUE`` pairs, then the command's named options.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from fundus_edge.config import parse_sets
from fundus_edge.errors import UserError

__all__ = ["INITS", "DistillSection", "load_distill_config", "student_defaults"]

#: ``auto``: start each student member from the teacher's member of the same backbone when the
#: teacher has one, else from ``model.weights``; ``teacher``: require that; ``weights``: always
#: ``model.weights`` (``none``, ``imagenet`` or a checkpoint).
INITS = ("auto", "teacher", "weights")


@dataclass
class DistillSection:
    """What the student learns from the teacher (the recipe's ``distill:`` section).

    Attributes:
        teacher: the teacher checkpoint (``.safetensors``).
        temperature: soft-label temperature ``T`` (the term is scaled by ``T²``).
        soft_weight: weight of the soft-label term (every image, labelled or not).
        map_weight: weight of the class-map term (student maps towards the teacher's,
            each label weighted by the teacher's probability).
        attention_weight: weight of the attention term. The ground truth (``optim.loss`` on
            labelled images, and the mask term ``optim.loss.mask_weight``) keeps weight 1: the
            distillation weights are relative to it.
        unlabelled: a folder of extra images without labels (any image the readers know, found
            recursively), used for the soft-label, map and attention terms only.
        unlabelled_limit: use at most this many of them (None: all).
        init: where the student's weights start (:data:`INITS`).
        targets_batch_size: images per teacher pass when the targets are computed.
    """

    teacher: str = ""
    temperature: float = 2.0
    soft_weight: float = 1.0
    map_weight: float = 1.0
    attention_weight: float = 0.5
    unlabelled: str | None = None
    unlabelled_limit: int | None = None
    init: str = "auto"
    targets_batch_size: int = 64

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self, source: str = "config") -> None:
        """Check values the types do not (one line naming the key)."""
        if not self.teacher:
            raise UserError(f"{source}: distill.teacher: no teacher checkpoint (--teacher PATH)")
        if self.init not in INITS:
            raise UserError(
                f"{source}: distill.init: {self.init!r} is not one of {', '.join(INITS)}"
            )
        for key, value, lo, open_lo in (
            ("temperature", self.temperature, 0.0, True),
            ("soft_weight", self.soft_weight, 0.0, False),
            ("map_weight", self.map_weight, 0.0, False),
            ("attention_weight", self.attention_weight, 0.0, False),
        ):
            v = float(value)
            if not math.isfinite(v) or v < lo or (open_lo and v == lo):
                bound = "> 0" if open_lo else ">= 0"
                raise UserError(f"{source}: distill.{key}: must be {bound}, got {value}")
        if self.soft_weight + self.map_weight + self.attention_weight == 0:
            raise UserError(
                f"{source}: distill: soft_weight, map_weight and attention_weight are all 0; "
                "nothing would be learnt from the teacher (use fundus-edge train)"
            )
        for key, value in (
            ("unlabelled_limit", self.unlabelled_limit),
            ("targets_batch_size", self.targets_batch_size),
        ):
            if value is not None and int(value) < 1:
                raise UserError(f"{source}: distill.{key}: must be >= 1, got {value}")


def student_defaults(teacher: str | Path) -> dict[str, Any]:
    """Dotted training-config keys a student takes from its teacher unless the recipe says
    otherwise: input size and normalisation (its maps and soft labels are the teacher's view
    of the same pixels), pooled heads (exact 1x1 CAM kernels), the attention mode.

    Reads the teacher checkpoint's meta only (not its tensors).
    """
    from fundus_edge.models.checkpoint import read_checkpoint_meta

    c = read_checkpoint_meta(teacher)["config"]
    return {
        "model.image_size": int(c["image_size"]),
        "model.mean": list(c["mean"]),
        "model.std": list(c["std"]),
        "model.head": "average",
        "model.member_head": "gap",
        "model.weights": "none",
        "enhance.attention": (c.get("enhance") or {}).get("attention", "prob_weighted"),
    }


def load_distill_config(
    path: str | Path | None,
    overrides: dict[str, Any],
    sets: list[str] | None = None,
    teacher_defaults=None,
):
    """Resolve the student's training config and the distill section.

    Args:
        path: the YAML recipe (``training/distill-*.yaml``), or None.
        overrides: dotted keys from the command's named options (``distill.teacher``,
            ``model.members``, ``epochs``, ...); they win over everything.
        sets: ``KEY=VALUE`` strings (``--set``), either section.
        teacher_defaults: a callable ``teacher path -> dotted defaults`` (the teacher's
            :func:`student_defaults`), applied under the recipe.

    Returns:
        ``(TrainConfig, DistillSection)``, both validated.

    Raises:
        UserError: a missing or malformed recipe, an unknown key, a bad value.
    """
    from fundus_edge.config import TrainConfig, resolve
    from fundus_edge.options import load_yaml_mapping

    recipe: dict[str, Any] = {}
    source = "config"
    if path is not None:
        source = str(path)
        recipe = dict(load_yaml_mapping(Path(path), "--config"))
    distill_d = recipe.pop("distill", None) or {}
    if not isinstance(distill_d, dict):
        raise UserError(f"{source}: distill: expected a mapping")
    _known_keys(distill_d, source)
    dist_d = {**distill_d}
    named: list[tuple[str, dict[str, Any]]] = []  # the training keys of --set, then options
    for name, pairs in (("--set", parse_sets(sets or [])), ("command-line options", overrides)):
        train_keys = {}
        for k, v in pairs.items():
            if k.startswith("distill."):
                dist_d[k.split(".", 1)[1]] = v
            else:
                train_keys[k] = v
        if train_keys:
            named.append((name, train_keys))
    if sets or overrides:
        source = f"{source} + command-line overrides"
    _known_keys(dist_d, source)
    section = _distill_section(dist_d, source)
    layers: list[tuple[str, dict[str, Any]]] = []
    if teacher_defaults is not None and section.teacher:
        layers.append((f"the teacher {section.teacher}", teacher_defaults(section.teacher)))
    layers.append((str(path) if path is not None else "config", recipe))
    cfg = resolve(TrainConfig, [*layers, *named], source)
    return cfg, section


def _known_keys(d: dict, source: str) -> None:
    names = {f.name for f in fields(DistillSection)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise UserError(
            f"{source}: unknown key distill.{unknown[0]} (known: {', '.join(sorted(names))})"
        )


def _distill_section(d: dict, source: str) -> DistillSection:
    from fundus_edge.options import options_from_dict

    section = options_from_dict(DistillSection, d, f"{source}: distill")
    for key, tp in (
        ("temperature", float),
        ("soft_weight", float),
        ("map_weight", float),
        ("attention_weight", float),
    ):
        v = getattr(section, key)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise UserError(f"{source}: distill.{key}: expected a number, got {v!r}")
        setattr(section, key, tp(v))
    for key in ("unlabelled_limit", "targets_batch_size"):
        v = getattr(section, key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise UserError(f"{source}: distill.{key}: expected an integer, got {v!r}")
    for key in ("teacher", "init"):
        if not isinstance(getattr(section, key), str):
            raise UserError(f"{source}: distill.{key}: expected a string")
    if section.unlabelled is not None:
        section.unlabelled = str(section.unlabelled)
    section.validate(source)
    return section
