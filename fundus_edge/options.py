"""Typed option dataclasses from plain dicts (model metadata, YAML recipes, checkpoints)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, TypeVar

from fundus_edge.errors import UserError

__all__ = ["load_yaml_mapping", "options_from_dict"]

T = TypeVar("T")


def options_from_dict(cls: type[T], d: dict[str, Any], what: str) -> T:
    """``cls(**d)``, where a key that is not a field is a :class:`UserError` naming it.

    Args:
        cls: a dataclass whose ``__post_init__`` validates values.
        d: the options; missing keys take the defaults.
        what: what the options are, for the message (``"preprocess"``, ``"model config"``).
    """
    if not isinstance(d, dict):
        raise UserError(f"{what} options must be a mapping, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(d) - names)
    if unknown:
        raise UserError(
            f"unknown {what} option {', '.join(map(repr, unknown))} (known: {', '.join(sorted(names))})"
        )
    return cls(**d)


def load_yaml_mapping(path: str | os.PathLike, option: str = "") -> dict[str, Any]:
    """Read a YAML file whose top level is a mapping (recipes, profiles, suites).

    Args:
        path: the file.
        option: the command-line option that named it (``--profile``), for the messages.

    Raises:
        UserError: a missing file, invalid YAML (with its line) or a top level that is not a
            mapping; one line naming the file.
    """
    import yaml

    path = Path(path)
    named = f"{option} {path}" if option else str(path)
    if not path.is_file():
        raise UserError(f"{named}: no such file")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_unique_keys_loader())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path}{where}: not valid YAML ({problem})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of options at the top level")
    return data


def _unique_keys_loader():
    """A safe YAML loader that refuses a key given twice in one mapping (the last would win)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *base" is not a key
                    continue
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} given twice", key_node.start_mark
                    )
                seen.add(key)
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader
