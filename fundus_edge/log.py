"""Logging and progress bars, configured by the CLI (never at import time)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["get_logger", "progress", "setup_logging"]

T = TypeVar("T")
_LOGGER_NAME = "fundus_edge"


def get_logger(name: str | None = None) -> logging.Logger:
    """Return the package logger or one of its children (``fundus_edge.<name>``)."""
    return logging.getLogger(_LOGGER_NAME if not name else f"{_LOGGER_NAME}.{name}")


def setup_logging(verbosity: int = 0, quiet: bool = False) -> None:
    """Send ``fundus_edge`` log records to stderr through rich.

    Args:
        verbosity: 0 = INFO, 1+ = DEBUG.
        quiet: only warnings and errors.
    """
    from rich.console import Console
    from rich.logging import RichHandler

    level = logging.WARNING if quiet else (logging.DEBUG if verbosity > 0 else logging.INFO)
    logger = logging.getLogger(_LOGGER_NAME)
    for h in list(logger.handlers):
        if getattr(h, "_fundus_edge", False):
            logger.removeHandler(h)
    handler = RichHandler(
        console=Console(stderr=True),
        show_time=verbosity > 0,
        show_path=verbosity > 0,
        markup=False,
        rich_tracebacks=False,
    )
    handler._fundus_edge = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def progress(
    items: Iterable[T], total: int | None = None, description: str = "", disable: bool | None = None
) -> Iterator[T]:
    """Iterate with a rich progress bar on stderr (hidden when stderr is not a terminal).

    Args:
        items: what to iterate over.
        total: number of items, if ``items`` has no ``len``.
        description: label shown left of the bar.
        disable: force the bar off (True) or on (False); default: on for a TTY only.
    """
    if disable is None:
        disable = not sys.stderr.isatty()
    if disable:
        yield from items
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    from rich.console import Console

    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        from rich.markup import escape

        task = bar.add_task(escape(description), total=total)  # a path's "[1]" is not a tag
        for item in items:
            yield item
            bar.advance(task)
