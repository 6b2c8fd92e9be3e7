"""Typed option dataclasses from plain dicts (model metadata, YAML recipes, checkpoints)."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from fundus_edge.errors import UserError

__all__ = ["options_from_dict"]

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
