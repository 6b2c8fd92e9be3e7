"""The one layered loader: a config dataclass's defaults <- YAML files <- command-line options.

Training recipes (:class:`fundus_edge.config.TrainConfig`), distillation recipes, export
profiles (:class:`fundus_edge.convert.export_config.ExportConfig`) and the benchmark suite's
scenario options all resolve here. A *layer* is a ``(name, mapping)`` pair: a recipe file, a
teacher's defaults, ``--set`` pairs, the command's named options. Its mapping holds nested
sections or dotted keys (``{"optim": {"lr": 1e-3}}`` or ``{"optim.lr": 1e-3}``); each layer is
checked on its own (unknown key, wrong type) so that an error names the layer it came from,
then merged over the earlier ones, later layers winning. Nested dataclass fields are sections.

A dataclass may shape its own tree with two optional class methods:

* ``upgrade_layer(nested, name) -> nested``: rewrite one layer before it is checked (an old
  layout's keys moved to their new place; keys that something else sets refused).
* ``complete(merged, given) -> merged``: fill fields tied to others after the merge, knowing
  which dotted keys some layer set (``data.preprocess.size`` follows ``model.image_size``).

and a ``validate(source)`` method that the result is checked with.

This module imports neither torch nor numpy: export on a device and the benchmark suite use it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import yaml

from fundus_edge.errors import UserError

__all__ = [
    "apply_overrides",
    "check_layer",
    "dotted",
    "flatten",
    "leaves",
    "merge",
    "nested",
    "parse_sets",
    "plain",
    "resolve",
]

T = TypeVar("T")


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
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, str):  # "a,b" from a command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            return False, value
        # list[X], tuple[X, ...] and tuple[X, X, X] alike: each item an X (the dataclass
        # checks a fixed length itself, with a message that says what the values mean)
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        out = []
        for item in value:
            ok, v = _type_ok(item, args[0]) if args else (True, item)
            if not ok:
                return False, value
            out.append(v)
        return True, tuple(out) if (origin or tp) is tuple else out
    if origin is dict or tp is dict:
        return isinstance(value, dict), value
    return isinstance(value, tp), value


def _build(cls: type, d: Any, source: str, prefix: str, make: bool = True) -> Any:
    """``cls`` from a nested mapping; an error names ``source`` and the dotted key.

    With ``make=False`` only the keys and types are checked (one layer alone: the dataclass's
    own checks that relate several fields wait for the merged values) and the converted
    mapping is returned.
    """
    where = prefix.rstrip(".") or "top level"
    if not isinstance(d, dict):
        raise UserError(f"{source}: {where}: expected a mapping")
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
            kwargs[key] = _build(tp, value, source, f"{prefix}{key}.", make)
            continue
        ok, conv = _type_ok(value, tp)
        if not ok:
            want = getattr(tp, "__name__", str(tp))
            raise UserError(f"{source}: {prefix}{key}: expected {want}, got {value!r}")
        kwargs[key] = conv
    if not make:
        return kwargs
    try:
        return cls(**kwargs)
    except UserError as exc:  # the dataclass's own checks: say where the values came from
        raise UserError(f"{source}: {where}: {exc}" if prefix else f"{source}: {exc}") from None


def merge(base: dict, update: dict) -> dict:
    """``update`` over ``base``, nested mappings merged key by key (neither is modified)."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
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


def leaves(d: dict, prefix: str = "") -> list[str]:
    """The dotted keys of a nested mapping's leaves."""
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out += leaves(v, f"{key}.")
        else:
            out.append(key)
    return out


def dotted(d: dict, key: str) -> Any:
    """The value at a dotted key of a nested mapping, or None."""
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as dotted keys: ``{"optim": {"lr": 1e-3}}`` -> ``{"optim.lr": 1e-3}``.

    Lists stay values (``model.members``); an empty mapping sets nothing and vanishes (an
    MLflow parameter ``{}`` would say nothing; a config section left empty keeps its
    defaults); a key that holds a dot already is kept whole. :func:`apply_overrides` turns the
    result back into the nested mapping. Used by the training config (old keys moved) and by
    experiment tracking (the config as MLflow parameters).
    """
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


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
    out = merge(d, {})
    for key, value in overrides.items():
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            child = node.get(p)
            node[p] = dict(child) if isinstance(child, dict) else {}
            node = node[p]
        node[parts[-1]] = value
    return out


def nested(layer: dict[str, Any]) -> dict[str, Any]:
    """A layer's dotted and nested keys as one nested mapping (dotted keys win)."""
    out = merge({}, {k: v for k, v in layer.items() if "." not in k})
    return apply_overrides(out, {k: v for k, v in layer.items() if "." in k})


def plain(value: Any) -> Any:
    """A YAML- and JSON-safe copy of a dataclass, mapping, list or tuple, all the way down.

    Dataclasses and mappings become dicts with text keys, tuples become lists; ``None``,
    booleans, numbers and text stay as they are; any other object becomes its text (a
    ``Path``), so ``yaml.safe_dump`` and ``json.dumps`` never meet a type they refuse. A
    config's ``config.yaml`` (:meth:`fundus_edge.config.TrainConfig.to_dict`), the benchmark
    suite's resolved options and a tracked run's config all go through here.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def check_layer(cls: type, layer: dict[str, Any], name: str) -> dict[str, Any]:
    """One layer's keys and types checked against ``cls`` alone (its ``upgrade_layer`` first).

    Returns:
        The layer as a nested mapping in ``cls``'s layout, values converted (``1e-3`` strings
        to floats, lists to tuples where the field is a tuple).

    Raises:
        UserError: an unknown key or a wrong type, naming ``name`` and the dotted key.
    """
    tree = nested(layer)
    upgrade = getattr(cls, "upgrade_layer", None)
    if upgrade is not None:
        tree = upgrade(tree, name)
    return _build(cls, tree, name, "", make=False)


def resolve(
    cls: type[T],
    layers: Iterable[tuple[str, dict[str, Any]]],
    source: str = "",
    validate: bool = True,
) -> T:
    """A config dataclass from its defaults and ``layers``, later layers winning.

    Args:
        cls: the dataclass (typed fields with defaults; nested dataclasses are sections; see
            the module docstring for its optional ``upgrade_layer``, ``complete`` and
            ``validate``).
        layers: ``(name, mapping)`` pairs; a mapping holds nested sections or dotted keys.
            Each layer's keys and types are checked alone, so an unknown key names its layer.
        source: what the final checks name (default: the layers' names joined by ``+``).
        validate: call the result's ``validate(source)`` (False: the types and the
            dataclasses' own checks only).

    Raises:
        UserError: an unknown key, a wrong type or an invalid value, naming where it came from.
    """
    d: dict[str, Any] = {}  # what the layers set; every other field keeps its default
    names, given = [], set()
    for name, layer in layers:
        tree = check_layer(cls, layer, name)  # names this layer's own bad keys
        d = merge(d, tree)
        given |= set(leaves(tree))
        names.append(name)
    source = source or " + ".join(names) or "config"
    complete = getattr(cls, "complete", None)
    if complete is not None:
        d = complete(d, given)
    cfg = _build(cls, d, source, "")
    if validate and hasattr(cfg, "validate"):
        cfg.validate(source)
    return cfg
