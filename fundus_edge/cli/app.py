"""The typer application and its error handling: one line and an exit code, no traceback."""

from __future__ import annotations

import os
import sys
import traceback

import typer
from typer.core import TyperGroup

try:  # typer >= 0.2x vendors click as typer._click; older releases use click itself
    from typer._click import exceptions as _cx
except ImportError:  # pragma: no cover - depends on the installed typer
    from click import exceptions as _cx  # type: ignore[no-redef]

from fundus_edge import __version__
from fundus_edge.errors import (
    EXIT_DEPENDENCY,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_USER,
    FundusEdgeError,
    missing_dependency_message,
    missing_module_of,
)
from fundus_edge.fileio import os_error_message

__all__ = ["app", "debug_enabled", "main"]

DEBUG_ENV = "FUNDUS_EDGE_DEBUG"


def debug_enabled(args: list[str] | None = None) -> bool:
    """``--debug`` anywhere on the command line, or ``FUNDUS_EDGE_DEBUG=1``."""
    if os.environ.get(DEBUG_ENV, "").strip().lower() in {"1", "true", "yes", "on"}:
        return True
    return "--debug" in (sys.argv[1:] if args is None else args)


def _fail(message: str, code: int) -> None:
    # One line on stderr; the caller exits with ``code``.
    typer.echo(f"fundus-edge: error: {message}", err=True)
    sys.exit(code)


# Set when a command was stopped by Ctrl-C (typer would otherwise exit 130 without a word).
_SIGINT_SEEN: list[int] = []


class FundusGroup(TyperGroup):
    """Runs the command in non-standalone mode and maps every failure to one line + exit code."""

    def resolve_command(self, ctx, args):  # type: ignore[override]
        from fundus_edge.errors import set_command

        name, cmd, rest = super().resolve_command(ctx, args)
        # Messages about a missing package name the command that needed it.
        set_command(cmd.name if cmd is not None else name)
        return name, cmd, rest

    def invoke(self, ctx):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:  # typer turns it into a silent exit 130: note it first
            _SIGINT_SEEN.append(1)
            raise

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # type: ignore[override]
        argv = list(sys.argv[1:] if args is None else args)
        debug = debug_enabled(argv)
        _SIGINT_SEEN.clear()
        # OpenCV prints "[ WARN ...]" lines of its own (a camera it cannot open, a codec):
        # our one-line errors say what failed; --debug lets its chatter through.
        if not debug:
            os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
        if "--debug" in argv:  # accepted anywhere on the line, handled as the global option
            argv = ["--debug", *[a for a in argv if a != "--debug"]]
        try:
            rv = super().main(
                args=argv, prog_name=prog_name or "fundus-edge", standalone_mode=False, **extra
            )
        except typer.Exit as exc:  # --help, --version, typer.Exit
            sys.exit(exc.exit_code)
        except _cx.UsageError as exc:
            if type(exc).__name__.startswith("NoArgsIsHelp"):
                # `fundus-edge` or a group alone: show its help, as a usage error.
                typer.echo(exc.ctx.get_help() if exc.ctx else str(exc), err=True)
                sys.exit(EXIT_USER)
            if debug:
                traceback.print_exc()
            hint = ""
            if exc.ctx is not None:
                hint = f" (see '{exc.ctx.command_path} --help')"
            _fail(exc.format_message().replace("\n", " ") + hint, EXIT_USER)
        except _cx.ClickException as exc:
            if debug:
                traceback.print_exc()
            _fail(exc.format_message().replace("\n", " "), exc.exit_code or EXIT_USER)
        except (typer.Abort, KeyboardInterrupt):
            typer.echo("fundus-edge: interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except FundusEdgeError as exc:
            if debug:
                traceback.print_exc()
            _fail(str(exc).replace("\n", " "), exc.exit_code)
        except ImportError as exc:
            # An optional module imported without `require`: still exit 3 naming the extra.
            module = missing_module_of(exc)
            if debug:
                traceback.print_exc()
            if module is None:
                _fail(
                    f"internal error: {type(exc).__name__}: {exc} "
                    f"(rerun with --debug or {DEBUG_ENV}=1 for the traceback, and please report it)",
                    EXIT_INTERNAL,
                )
            _fail(missing_dependency_message(module, detail=str(exc)), EXIT_DEPENDENCY)
        except Exception as exc:
            if debug:
                traceback.print_exc()
            # Permissions, read-only or full disks, a file where a folder should be: the user
            # can fix these, so one line naming the path, not an "internal error".
            msg = os_error_message(exc) if isinstance(exc, OSError) else None
            if msg is not None:
                _fail(msg, EXIT_USER)
            if debug:
                _fail(f"internal error: {type(exc).__name__}: {exc}", EXIT_INTERNAL)
            _fail(
                f"internal error: {type(exc).__name__}: {exc} "
                f"(rerun with --debug or {DEBUG_ENV}=1 for the traceback, and please report it)",
                EXIT_INTERNAL,
            )
        # In non-standalone mode click returns the command's return value (an int or None);
        # typer turns a Ctrl-C it catches into a silent 130, so say what happened.
        if rv == EXIT_INTERRUPTED and _SIGINT_SEEN:
            typer.echo("fundus-edge: interrupted", err=True)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=FundusGroup,
    name="fundus-edge",
    help="Retinal multi-disease screening from workstation to fundus camera: "
    "train the Grad-CAM-augmented VGG19 + ResNet50 ensemble, export one fused graph, run it live.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fundus-edge {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    verbose: int = typer.Option(
        0, "--verbose", "-v", count=True, help="More log output (-v: debug)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors."),
    debug: bool = typer.Option(
        False, "--debug", help=f"Show Python tracebacks on errors (or set {DEBUG_ENV}=1)."
    ),
) -> None:
    from fundus_edge.log import setup_logging

    setup_logging(verbosity=verbose + (1 if debug else 0), quiet=quiet)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``fundus-edge``)."""
    from fundus_edge import cli  # noqa: F401  (registers every command on ``app``)

    app(args=argv)
