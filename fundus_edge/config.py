"""Typed training configuration: dataclass defaults <- YAML recipe <- command-line overrides.

A recipe (``training/*.yaml``) is a nested mapping whose sections mirror the dataclasses below;
unknown keys and wrongly typed values are refused with one line naming the file and the key.
Overrides are dotted ``key=value`` pairs (``optim.lr=1e-3``, ``model.members=[resnet18]``),
their values parsed as YAML. The resolved config is saved beside every run as ``config.yaml``,
so a run can be repeated from its own directory.

:func:`resolve` is the one layered loader: a dataclass's defaults, then any number of layers
(a recipe, a teacher's defaults, ``--set`` pairs, named options), each a nested or dotted
mapping checked on its own so that an error names the layer it came from. :func:`load_config`
is it for :class:`TrainConfig`. The sections that mirror other modules' configs have one
conversion each: :meth:`TrainConfig.ensemble_config`, :meth:`TrainConfig.preprocess_config`,
:meth:`TrainConfig.augment_config`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from fundus_edge.errors import UserError
from fundus_edge.losses import LossConfig
from fundus_edge.options import load_yaml_mapping

__all__ = [
    "CAM_METHODS",
    "MEMORY_FORMATS",
    "SELECT_METRICS",
    "DataSection",
    "EnhanceSection",
    "ModelSection",
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

T = TypeVar("T")

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


@dataclass
class ModelSection:
    """The ensemble (mirrors :class:`fundus_edge.models.EnsembleConfig`)."""

    members: list[str] = field(default_factory=lambda: ["vgg19", "resnet50"])
    head: str = "average"  # "average" per-member heads | "fusion" one head on pooled features
    member_head: str = "native"  # "native" torchvision head | "gap" pooled linear head
    weights: str = "imagenet"  # "imagenet" | "none" | path to a checkpoint
    imagenet_dir: str | None = None  # folder of torchvision weight files (default: hub cache)
    dropout: float = 0.2
    image_size: int = 224
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


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
    preprocess: dict = field(default_factory=dict)  # PreprocessConfig fields; size = image_size
    batch_size: int = 16
    eval_batch_size: int = 32
    num_workers: int = 2
    sampler: str = "shuffle"  # "shuffle" | "label_aware" (rare labels drawn more often)
    hflip: float = 0.5
    vflip: float = 0.0
    rotate: float = 15.0  # degrees, uniform in [-rotate, rotate]
    brightness: float = 0.1  # multiplicative jitter amplitude
    contrast: float = 0.1
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
    amp: str = "auto"  # "auto" (fp16 on CUDA) | "fp16" | "bf16" | "none"
    # Weight and activation layout: "auto" is channels_last on CPU (oneDNN's convolutions run
    # ~1.4x faster a training step there, measured on a 2-core EPYC) and the default elsewhere;
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
    model: ModelSection = field(default_factory=ModelSection)
    enhance: EnhanceSection = field(default_factory=EnhanceSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)

    def to_dict(self) -> dict:
        """The nested mapping ``config.yaml`` holds."""
        return asdict(self)

    def ensemble_config(self, label_names: list[str] | tuple[str, ...]):
        """The :class:`~fundus_edge.models.EnsembleConfig` this run trains, for these labels.

        ``enhance.op: none`` builds the original view only (the exported model runs one pass).
        """
        from fundus_edge.models import EnhanceConfig, EnsembleConfig

        m, e = self.model, self.enhance
        return EnsembleConfig(
            members=tuple(m.members),
            num_classes=len(label_names),
            label_names=tuple(label_names),
            head=m.head,
            member_head=m.member_head,
            weights=m.weights,
            imagenet_dir=m.imagenet_dir,
            dropout=m.dropout,
            image_size=m.image_size,
            mean=tuple(m.mean),
            std=tuple(m.std),
            views="original" if e.op == "none" else "both",
            enhance=EnhanceConfig(
                op="weight" if e.op == "none" else e.op,
                lam=e.lam,
                theta=e.theta,
                pad=e.pad,
                attention=e.attention,
            ),
        )

    def preprocess_config(self):
        """The :class:`~fundus_edge.preprocess.PreprocessConfig` of ``data.preprocess``, its
        size ``model.image_size``.

        Raises:
            UserError: ``data.preprocess.size`` given and not ``model.image_size``, or a bad
                preprocessing option.
        """
        from fundus_edge.preprocess import PreprocessConfig

        pre = dict(self.data.preprocess)
        if "size" in pre and pre["size"] != self.model.image_size:
            raise UserError(
                f"size {pre['size']} differs from model.image_size {self.model.image_size}; "
                "set only model.image_size"
            )
        return PreprocessConfig.from_dict({**pre, "size": self.model.image_size})

    def augment_config(self):
        """The :class:`~fundus_edge.torchdata.AugmentConfig` of ``data``'s augmentation keys."""
        from fundus_edge.torchdata import AugmentConfig

        d = self.data
        return AugmentConfig(d.hflip, d.vflip, d.rotate, d.brightness, d.contrast)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> TrainConfig:
        """Build from a nested mapping; unknown keys or bad types raise :class:`UserError`."""
        return _build(cls, d, source, "")

    def validate(self, source: str = "config") -> None:
        """Check choices that the types alone do not (one line naming the key)."""
        checks = [
            ("model.head", self.model.head, ("average", "fusion")),
            ("model.member_head", self.model.member_head, ("native", "gap")),
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
        if not self.model.members:
            raise UserError(f"{source}: model.members: at least one member is needed")
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
        for key, vec, positive in (
            ("model.mean", self.model.mean, False),
            ("model.std", self.model.std, True),
        ):
            if len(vec) != 3 or (positive and min(vec) <= 0):
                each = ", each > 0" if positive else ""
                raise UserError(f"{source}: {key}: expected 3 values (R, G, B){each}, got {vec}")
        try:
            self.preprocess_config()
        except UserError as exc:  # name the recipe and section, not just the option
            raise UserError(f"{source}: data.preprocess: {exc}") from None
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
            ("data.hflip", d.hflip, "[0, 1]"),
            ("data.vflip", d.vflip, "[0, 1]"),
            ("data.rotate", d.rotate, "[0, 180]"),
            ("data.brightness", d.brightness, "[0, 1)"),
            ("data.contrast", d.contrast, "[0, 1)"),
            ("data.limit", d.limit, "[1, inf)"),
            ("enhance.lam", e.lam, "[0, 1]"),
            ("enhance.theta", e.theta, "[0, 1]"),
            ("enhance.pad", e.pad, "[0, inf)"),
            ("enhance.warmup_epochs", e.warmup_epochs, "[0, inf)"),
            ("model.dropout", self.model.dropout, "[0, 1)"),
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


def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """Whether ``value`` fits the annotation ``tp``; returns a possibly converted value."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = _type_ok(value, arg)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if tp is str:
        return isinstance(value, str), value
    if origin is list or tp is list:
        if isinstance(value, str):  # "a,b" from a command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            return False, value
        args = typing.get_args(tp)
        if not args:
            return True, list(value)
        out = []
        for item in value:
            ok, v = _type_ok(item, args[0])
            if not ok:
                return False, value
            out.append(v)
        return True, out
    if origin is dict or tp is dict:
        return isinstance(value, dict), value
    return isinstance(value, tp), value


def _build(cls: type, d: Any, source: str, prefix: str) -> Any:
    if not isinstance(d, dict):
        raise UserError(f"{source}: {prefix.rstrip('.') or 'top level'}: expected a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in d.items():
        if key not in names:
            raise UserError(
                f"{source}: unknown key {prefix}{key!s} (known: {', '.join(sorted(names))})"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, source, f"{prefix}{key}.")
            continue
        ok, conv = _type_ok(value, tp)
        if not ok:
            want = getattr(tp, "__name__", str(tp))
            raise UserError(f"{source}: {prefix}{key}: expected {want}, got {value!r}")
        kwargs[key] = conv
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "preprocess":
            out[k] = _merge(out[k], v)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def parse_sets(sets: Iterable[str], option: str = "--set") -> dict[str, Any]:
    """``["optim.lr=1e-3", ...]`` -> ``{"optim.lr": 0.001}`` (values parsed as YAML).

    Raises:
        UserError: an item without ``=``.
    """
    pairs: dict[str, Any] = {}
    for item in sets:
        if "=" not in item:
            raise UserError(f"{option} {item!r}: expected KEY=VALUE, e.g. optim.lr=1e-3")
        k, v = item.split("=", 1)
        pairs[k.strip()] = yaml.safe_load(v) if v.strip() else ""
    return pairs


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as dotted keys; ``data.preprocess`` stays one key (a mapping)."""
    return {key: _dotted(d, key[len(prefix) :]) for key in _leaves(d, prefix)}


def apply_overrides(d: dict, overrides: dict[str, Any] | list[str]) -> dict:
    """Set dotted keys in a nested mapping.

    Args:
        d: the nested mapping (not modified).
        overrides: ``{"optim.lr": 1e-3}`` or ``["optim.lr=1e-3", ...]`` (values parsed as YAML).

    Raises:
        UserError: a ``key=value`` string without ``=``.
    """
    if isinstance(overrides, list):
        overrides = parse_sets(overrides)
    out = _merge(d, {})
    for key, value in overrides.items():
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            child = node.get(p)
            node[p] = dict(child) if isinstance(child, dict) else {}
            node = node[p]
        node[parts[-1]] = value
    return out


def resolve(cls: type[T], layers: Iterable[tuple[str, dict[str, Any]]], source: str = "") -> T:
    """A config dataclass from its defaults and ``layers``, later layers winning.

    Args:
        cls: the dataclass (:class:`TrainConfig`, or any with typed fields and defaults; a
            ``validate(source)`` method is called on the result).
        layers: ``(name, mapping)`` pairs; a mapping holds nested sections or dotted keys
            (``{"optim": {"lr": 1e-3}}`` or ``{"optim.lr": 1e-3}``). Each layer's keys and
            types are checked alone, so an unknown key names its own layer.
        source: what the final checks name (default: the layers' names joined by ``+``).

    Raises:
        UserError: an unknown key, a wrong type or an invalid value.
    """
    d = asdict(cls())
    names = []
    for name, layer in layers:
        nested = apply_overrides({}, {k: v for k, v in layer.items() if "." in k})
        nested = _merge(nested, {k: v for k, v in layer.items() if "." not in k})
        _build(cls, nested, name, "")  # names this layer's own bad keys
        d = _merge(d, nested)
        names.append(name)
    source = source or " + ".join(names) or "config"
    cfg = _build(cls, d, source, "")
    if hasattr(cfg, "validate"):
        cfg.validate(source)
    return cfg


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
    """The dotted keys a recipe, named options and ``--set`` pairs set (what the user chose).

    ``data.preprocess`` counts as one key (a mapping of options).
    """
    keys = set(overrides or {})
    keys |= {item.split("=", 1)[0].strip() for item in sets or [] if "=" in item}
    if path is not None:
        keys |= set(_leaves(load_yaml_mapping(Path(path), "--config")))
    return keys


def config_changes(
    old: TrainConfig,
    new: TrainConfig,
    keys: Iterable[str] | None = None,
    keep: Iterable[str] = (),
) -> list[tuple[str, Any, Any]]:
    """``(key, old value, new value)`` for each dotted key whose value differs, sorted.

    Args:
        old, new: the two configs.
        keys: the keys to compare (default: every key of either, preprocess options included).
        keep: keys that may differ, by full key or by top-level section (``out``).
    """
    a, b = old.to_dict(), new.to_dict()
    if keys is None:
        keys = set(_leaves(a, whole=())) | set(_leaves(b, whole=()))
    keep = set(keep)
    changes = []
    for key in sorted(set(keys)):
        if key in keep or key.split(".")[0] in keep:
            continue
        va, vb = _dotted(a, key), _dotted(b, key)
        if va != vb:
            changes.append((key, va, vb))
    return changes


def _dotted(d: dict, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _leaves(d: dict, prefix: str = "", whole: tuple[str, ...] = ("data.preprocess",)) -> list[str]:
    """Dotted keys of a nested mapping; the mappings named in ``whole`` count as one key."""
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in whole:
            out += _leaves(v, f"{key}.", whole)
        else:
            out.append(key)
    return out


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    from fundus_edge.fileio import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
