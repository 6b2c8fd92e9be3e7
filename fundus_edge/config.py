"""Typed training configuration: dataclass defaults <- YAML recipe <- command-line overrides.

A recipe (``training/*.yaml``) is a nested mapping of :class:`TrainConfig`'s sections; unknown
keys and wrongly typed values are refused with one line naming the file and the key. Overrides
are dotted ``key=value`` pairs (``optim.lr=1e-3``, ``model.members=[resnet18]``), their values
parsed as YAML. The resolved config is saved beside every run as ``config.yaml``, so a run can
be repeated from its own directory.

One config tree: the sections hold the other modules' own dataclasses, with their defaults,
not mirrors of them. ``model`` *is* the :class:`~fundus_edge.models.EnsembleConfig` (less the
keys a run derives: ``num_classes`` and ``label_names`` from the data, ``views`` and ``enhance``
from the ``enhance`` section, see :meth:`TrainConfig.ensemble_config`); ``data.preprocess`` is
the :class:`~fundus_edge.preprocess.PreprocessConfig` (its ``size`` follows
``model.image_size``); ``data.augment`` is the :class:`~fundus_edge.torchdata.AugmentConfig`.

:func:`fundus_edge.layered.resolve` is the one layered loader (re-exported here);
:func:`load_config` is it for :class:`TrainConfig`. Config files written before the sections
held those dataclasses (augmentation keys ``data.hflip`` ... directly in ``data``) still load:
:meth:`TrainConfig.upgrade_layer` moves them (``OLD_KEYS``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fundus_edge.errors import UserError
from fundus_edge.layered import apply_overrides, dotted, flatten, leaves, parse_sets, plain, resolve
from fundus_edge.losses import LossConfig
from fundus_edge.models.ensemble import EnsembleConfig
from fundus_edge.options import load_yaml_mapping
from fundus_edge.preprocess import PreprocessConfig
from fundus_edge.torchdata import AugmentConfig

__all__ = [
    "CAM_METHODS",
    "DERIVED_KEYS",
    "MEMORY_FORMATS",
    "OLD_KEYS",
    "SELECT_METRICS",
    "DataSection",
    "EnhanceSection",
    "OptimSection",
    "TrainConfig",
    "apply_overrides",
    "config_changes",
    "flatten",
    "given_keys",
    "load_config",
    "parse_sets",
    "resolve",
    "save_config",
]


#: ``kernel``: the forward-only CAM kernels of the model (fast, exact Grad-CAM for pooled heads).
#: The others use the ``grad-cam`` package (a backward pass per class; slow, for comparison).
CAM_METHODS = ("kernel", "gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigencam")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")

#: What ``select`` may name: a validation metric of each epoch's record (``metrics.jsonl``);
#: ``auto`` is the RIADD score, else macro AUROC. A ``*_loss`` is minimised, the rest maximised.
SELECT_METRICS = (
    "auto",
    "val_loss",
    "val_macro_auroc",
    "val_map",
    "val_macro_f1",
    "val_micro_f1",
    "val_riadd",
    "val_screening_auroc",
    "val_elementwise_accuracy",
)


#: Fields of the held dataclasses that a run derives, and from what: not in ``config.yaml``
#: and refused in a recipe or on the command line (``data.preprocess.size`` may repeat
#: ``model.image_size``). The ``enhance`` section keeps the training-only keys (``op: none``,
#: warm-up, which maps train, CAM method) and hands ``lam``/``theta``/``pad``/``attention`` to
#: the model's EnhanceConfig, whose defaults they share.
DERIVED_KEYS = {
    "model.num_classes": "the dataset's labels",
    "model.label_names": "the dataset's labels",
    "model.views": "enhance.op (none: the original view only)",
    "model.enhance": "the enhance section",
    "data.preprocess.size": "model.image_size",
}
#: The layout before the sections held their modules' dataclasses: old key -> new key.
OLD_KEYS = {f"data.{k}": f"data.augment.{k}" for k in AugmentConfig.__dataclass_fields__}


@dataclass
class EnhanceSection:
    """CAM-guided enhancement during training (the paper's augmentation).

    Attributes:
        op: ``"weight"``, ``"crop"``, ``"drop"`` (training only) or ``"none"`` (plain training,
            and the exported model runs the original view only).
        lam: weighting floor ``λ`` in ``x·(λ + (1-λ)·M)``.
        theta: threshold (fraction of the map's max) for crop/drop.
        pad: crop box padding (fraction of its size).
        warmup_epochs: plain epochs before the maps are trusted to guide enhancement.
        train_weights: which classes' maps make the training attention: ``"targets"`` (the
            ground-truth positive labels; images with none fall back to the predicted
            probabilities) or ``"probs"`` (the predicted probabilities, as at inference).
        attention: how class maps combine (the model's mode, also used at inference):
            ``"prob_weighted"`` (weighted mean of per-member, per-class min-max maps) or
            ``"top_class"``.
        cam_method: ``"kernel"`` (forward-only, from the same pass) or a ``grad-cam`` method
            name (a backward pass per class and member: slow, for comparison only).
    """

    op: str = "weight"
    lam: float = 0.5
    theta: float = 0.5
    pad: float = 0.1
    warmup_epochs: int = 1
    train_weights: str = "targets"
    attention: str = "prob_weighted"
    cam_method: str = "kernel"


@dataclass
class DataSection:
    """Dataset, preprocessing, augmentation and loading."""

    root: str = ""
    format: str = "auto"
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)  # size: image_size
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    batch_size: int = 16
    eval_batch_size: int = 32
    num_workers: int = 2
    sampler: str = "shuffle"  # "shuffle" | "label_aware" (rare labels drawn more often)
    cache: bool = True  # keep preprocessed (uint8, image_size) images in memory
    limit: int | None = None  # use at most this many samples per split (smoke runs)


@dataclass
class OptimSection:
    """Optimiser, schedule, transfer learning and loss."""

    optimizer: str = "adamw"  # "adamw" | "sgd"
    lr: float = 3e-4
    backbone_lr_mult: float = 0.1  # backbone LR = lr * mult once unfrozen
    weight_decay: float = 1e-4
    momentum: float = 0.9
    warmup_epochs: float = 1.0  # linear LR warm-up, then cosine to min_lr_ratio * lr
    min_lr_ratio: float = 0.01
    schedule: str = "cosine"  # "cosine" | "constant"
    freeze_epochs: int = 0  # backbone frozen (heads only) for this many epochs
    grad_clip: float = 1.0  # max gradient norm; 0 disables
    amp: str = "auto"  # "auto" (CUDA: fp16, else none) | "fp16" (CUDA) | "bf16" | "none"
    # Weight and activation layout: "auto" is channels_last on CPU (oneDNN's convolutions run
    # a training step ~1.25x faster there, measured on a 2-core EPYC) and the default elsewhere;
    # "channels_last" | "contiguous" force one. Same maths, different rounding order.
    memory_format: str = "auto"
    ema: float = 0.0  # EMA decay (e.g. 0.999); 0 disables
    # BatchNorm running-statistics momentum; None keeps each backbone's own. MobileNetV3 and
    # EfficientNet use 0.01, made for long ImageNet runs: over a short run from random init
    # their running statistics lag the weights and validation sees garbage.
    bn_momentum: float | None = None
    loss: LossConfig = field(default_factory=LossConfig)


@dataclass
class TrainConfig:
    """Everything one training run needs; saved as ``config.yaml`` in the run directory."""

    name: str = "run"
    out: str = ""  # run directory; default runs/<name>
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    epochs: int = 10
    stop_after: int | None = None  # stop (resumably) after this many epochs: tests, time slots
    select: str = "auto"  # best-checkpoint metric: "auto" (RIADD score, else macro AUROC) or a key
    # thresholds tuned per label on validation: f1 | youden | sens@X | spec@X (operating.py)
    threshold_policy: str = "f1"
    deterministic: bool = True
    model: EnsembleConfig = field(default_factory=EnsembleConfig)
    enhance: EnhanceSection = field(default_factory=EnhanceSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)

    def to_dict(self) -> dict:
        """The nested mapping ``config.yaml`` holds (without :data:`DERIVED_KEYS`)."""
        d = plain(self)
        for key in DERIVED_KEYS:
            section, _, name = key.rpartition(".")
            dotted(d, section).pop(name, None)
        return d

    def ensemble_config(self, label_names: list[str] | tuple[str, ...]) -> EnsembleConfig:
        """The :class:`~fundus_edge.models.EnsembleConfig` this run trains, for these labels:
        ``model`` with the keys a run derives filled in.

        ``enhance.op: none`` builds the original view only (the exported model runs one pass).
        """
        import dataclasses

        from fundus_edge.models import EnhanceConfig

        e = self.enhance
        return dataclasses.replace(
            self.model,
            num_classes=len(label_names),
            label_names=tuple(label_names),
            views="original" if e.op == "none" else "both",
            enhance=EnhanceConfig(
                op="weight" if e.op == "none" else e.op,
                lam=e.lam,
                theta=e.theta,
                pad=e.pad,
                attention=e.attention,
            ),
        )

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> TrainConfig:
        """Build from a nested mapping (a ``config.yaml``, old layout included); unknown keys
        or bad types raise :class:`UserError`; :meth:`validate` checks the values."""
        return resolve(cls, [(source, d)], source, validate=False)

    @classmethod
    def upgrade_layer(cls, tree: dict, source: str) -> dict:
        """One layer in today's layout: :data:`OLD_KEYS` moved, derived keys refused.

        Raises:
            UserError: a layer sets a key of :data:`DERIVED_KEYS` (other than
                ``data.preprocess.size``, which may repeat ``model.image_size``), or both an old
                key and its new one.
        """
        for key, what in DERIVED_KEYS.items():
            if key != "data.preprocess.size" and dotted(tree, key) is not None:
                raise UserError(f"{source}: {key}: set by {what}, not by a key of its own")
        flat = flatten(tree)
        moved = {old: flat.pop(old) for old in OLD_KEYS if old in flat}
        if not moved:
            return tree
        for old in moved:
            if OLD_KEYS[old] in flat:
                raise UserError(f"{source}: {old} and {OLD_KEYS[old]} both given; keep the second")
        return apply_overrides({}, {**flat, **{OLD_KEYS[k]: v for k, v in moved.items()}})

    @classmethod
    def complete(cls, d: dict, given: set[str]) -> dict:
        """``data.preprocess.size`` follows ``model.image_size`` unless a layer set it
        (:meth:`validate` then checks they agree)."""
        if "data.preprocess.size" in given:
            return d
        size = dotted(d, "model.image_size")
        size = EnsembleConfig.image_size if size is None else size
        return apply_overrides(d, {"data.preprocess.size": size})

    def validate(self, source: str = "config") -> None:
        """Check choices that the types alone do not (one line naming the key)."""
        checks = [
            ("enhance.op", self.enhance.op, ("weight", "crop", "drop", "none")),
            ("enhance.train_weights", self.enhance.train_weights, ("targets", "probs")),
            ("enhance.attention", self.enhance.attention, ("prob_weighted", "top_class")),
            ("enhance.cam_method", self.enhance.cam_method, CAM_METHODS),
            ("data.sampler", self.data.sampler, ("shuffle", "label_aware")),
            ("optim.optimizer", self.optim.optimizer, ("adamw", "sgd")),
            ("optim.schedule", self.optim.schedule, ("cosine", "constant")),
            ("optim.amp", self.optim.amp, ("auto", "fp16", "bf16", "none")),
            ("optim.memory_format", self.optim.memory_format, MEMORY_FORMATS),
        ]
        for key, value, allowed in checks:
            if value not in allowed:
                raise UserError(
                    f"{source}: {key}: {value!r} is not one of {', '.join(map(str, allowed))}"
                )
        for key, value in (
            ("epochs", self.epochs),
            ("data.batch_size", self.data.batch_size),
            ("model.image_size", self.model.image_size),
        ):
            if value < 1:
                raise UserError(f"{source}: {key}: must be >= 1, got {value}")
        if self.model.image_size < 32:
            raise UserError(
                f"{source}: model.image_size: must be >= 32, got {self.model.image_size}"
            )
        if self.stop_after is not None and self.stop_after < 1:
            raise UserError(f"{source}: stop_after: must be >= 1, got {self.stop_after}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise UserError(
                f"{source}: device: {self.device!r}: expected auto, cpu, cuda or cuda:N"
            )
        if self.data.preprocess.size != self.model.image_size:
            raise UserError(
                f"{source}: data.preprocess.size {self.data.preprocess.size} differs from "
                f"model.image_size {self.model.image_size}; set only model.image_size"
            )
        from fundus_edge.operating import parse_policy

        parse_policy(self.threshold_policy, f"{source}: threshold_policy")
        if self.select not in SELECT_METRICS:
            raise UserError(
                f"{source}: select: {self.select!r} is not one of {', '.join(SELECT_METRICS)}"
            )
        o, d, e, loss = self.optim, self.data, self.enhance, self.optim.loss
        # key, value, interval ("[a, b)": a allowed, b not; "inf" unbounded)
        ranges: list[tuple[str, float | None, str]] = [
            ("optim.lr", o.lr, "(0, inf)"),
            ("optim.backbone_lr_mult", o.backbone_lr_mult, "[0, inf)"),
            ("optim.weight_decay", o.weight_decay, "[0, inf)"),
            ("optim.momentum", o.momentum, "[0, 1)"),
            ("optim.warmup_epochs", o.warmup_epochs, "[0, inf)"),
            ("optim.min_lr_ratio", o.min_lr_ratio, "[0, 1]"),
            ("optim.freeze_epochs", o.freeze_epochs, "[0, inf)"),
            ("optim.grad_clip", o.grad_clip, "[0, inf)"),
            ("optim.bn_momentum", o.bn_momentum, "(0, 1]"),
            ("optim.ema", o.ema, "[0, 1)"),
            ("optim.loss.pos_weight_max", loss.pos_weight_max, "(0, inf)"),
            ("optim.loss.gamma", loss.gamma, "[0, inf)"),
            ("optim.loss.alpha", loss.alpha, "[0, 1]"),
            ("optim.loss.gamma_pos", loss.gamma_pos, "[0, inf)"),
            ("optim.loss.gamma_neg", loss.gamma_neg, "[0, inf)"),
            ("optim.loss.clip", loss.clip, "[0, 1)"),
            ("optim.loss.mask_weight", loss.mask_weight, "[0, inf)"),
            ("data.eval_batch_size", d.eval_batch_size, "[1, inf)"),
            ("data.num_workers", d.num_workers, "[0, inf)"),
            ("data.augment.hflip", d.augment.hflip, "[0, 1]"),
            ("data.augment.vflip", d.augment.vflip, "[0, 1]"),
            ("data.augment.rotate", d.augment.rotate, "[0, 180]"),
            ("data.augment.brightness", d.augment.brightness, "[0, 1)"),
            ("data.augment.contrast", d.augment.contrast, "[0, 1)"),
            ("data.limit", d.limit, "[1, inf)"),
            ("enhance.lam", e.lam, "[0, 1]"),
            ("enhance.theta", e.theta, "[0, 1]"),
            ("enhance.pad", e.pad, "[0, inf)"),
            ("enhance.warmup_epochs", e.warmup_epochs, "[0, inf)"),
        ]
        for key, value, interval in ranges:
            if value is not None and not _in_interval(value, interval):
                raise UserError(f"{source}: {key}: must be in {interval}, got {value}")


def _in_interval(value: float, interval: str) -> bool:
    """``value`` finite and inside an interval written ``[0, 1)``, ``(0, inf)``."""
    lo_s, hi_s = interval[1:-1].split(",")
    lo, hi = float(lo_s), float(hi_s)
    above = value >= lo if interval[0] == "[" else value > lo
    below = value <= hi if interval[-1] == "]" else value < hi
    return math.isfinite(value) and above and below


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | list[str] | None = None,
    sets: list[str] | None = None,
) -> TrainConfig:
    """Defaults, then the YAML recipe at ``path`` (if any), then ``sets``, then ``overrides``.

    Args:
        path: YAML recipe.
        overrides: dotted keys -> values (the command's named options).
        sets: ``KEY=VALUE`` strings (``--set``), values parsed as YAML.

    Raises:
        UserError: missing or malformed recipe, unknown key, wrong type, invalid choice.
    """
    layers: list[tuple[str, dict[str, Any]]] = []
    if path is not None:
        layers.append((str(path), load_yaml_mapping(Path(path), "--config")))
    if sets:
        layers.append(("--set", parse_sets(sets)))
    if overrides:
        over = parse_sets(overrides) if isinstance(overrides, list) else overrides
        layers.append(("command-line options", over))
    source = str(path) if path is not None else "config"
    if sets or overrides:
        source = f"{source} + command-line overrides"
    return resolve(TrainConfig, layers, source)


def given_keys(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    sets: list[str] | None = None,
) -> set[str]:
    """The dotted keys a recipe, named options and ``--set`` pairs set (what the user chose),
    in today's layout (:data:`OLD_KEYS` moved)."""
    keys = set(overrides or {})
    keys |= {item.split("=", 1)[0].strip() for item in sets or [] if "=" in item}
    if path is not None:
        keys |= set(leaves(load_yaml_mapping(Path(path), "--config")))
    return {OLD_KEYS.get(k, k) for k in keys}


def config_changes(
    old: TrainConfig,
    new: TrainConfig,
    keys: Iterable[str] | None = None,
    keep: Iterable[str] = (),
) -> list[tuple[str, Any, Any]]:
    """``(key, old value, new value)`` for each dotted key whose value differs, sorted.

    Args:
        old, new: the two configs.
        keys: the keys to compare (default: every key of either); a section's key compares
            the whole section.
        keep: keys that may differ, by full key or by top-level section (``out``).
    """
    a, b = old.to_dict(), new.to_dict()
    if keys is None:
        keys = set(leaves(a)) | set(leaves(b))
    keep = set(keep)
    changes = []
    for key in sorted(set(keys)):
        if key in keep or key.split(".")[0] in keep:
            continue
        va, vb = dotted(a, key), dotted(b, key)
        if va != vb:
            changes.append((key, va, vb))
    return changes


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    from fundus_edge.fileio import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
