"""Error types and exit codes shared by every command.

Exit codes (documented in README "Exit codes"):

* 0 - success
* 1 - internal error (a bug: please report it with ``--debug`` output)
* 2 - user error: a missing file, a bad option, bad data under ``--strict``
* 3 - missing optional dependency (the message names the extra to install)
* 130 - interrupted (Ctrl-C / SIGTERM); outputs written so far are complete
"""

from __future__ import annotations

__all__ = [
    "EXIT_DEPENDENCY",
    "EXIT_INTERNAL",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USER",
    "OPTIONAL_MODULES",
    "DataError",
    "DiskFullError",
    "FundusEdgeError",
    "MissingDependencyError",
    "UserError",
    "missing_dependency_message",
    "missing_module_of",
    "require",
    "require_all",
    "set_command",
]

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USER = 2
EXIT_DEPENDENCY = 3
EXIT_INTERRUPTED = 130


class FundusEdgeError(Exception):
    """Base of all errors the CLI turns into one clear line and an exit code."""

    exit_code = EXIT_INTERNAL


class UserError(FundusEdgeError):
    """The user gave something wrong: a path, an option, a file. Exit code 2."""

    exit_code = EXIT_USER


class DataError(UserError):
    """Bad data in a user's file; the message names the file, row and column."""


class DiskFullError(UserError):
    """The disk (or quota) filled up while writing a file. Exit code 2: free space, rerun."""


def disk_full_message(path, free_bytes: int | None = None) -> str:
    """One line naming the file that could not be written and what is free there."""
    free = "" if free_bytes is None else f" ({free_bytes / 2**20:.0f} MiB free there)"
    return (
        f"{path}: no space left on device{free}; nothing was replaced (the previous file, if "
        "any, is intact); free some space and rerun (a training run resumes with --resume)"
    )


class MissingDependencyError(FundusEdgeError):
    """An optional dependency is not installed; the message names the extra. Exit code 3."""

    exit_code = EXIT_DEPENDENCY


# Optional modules: import name -> (extra, distribution). ``None`` as the extra: a base
# dependency (its absence is a broken install). Jetson gets its own hints (see `_jetson_hint`).
OPTIONAL_MODULES: dict[str, tuple[str | None, str]] = {
    "torch": ("train", "torch"),
    "torchvision": ("train", "torchvision"),
    "pytorch_grad_cam": ("train", "grad-cam"),
    "safetensors": ("train", "safetensors"),
    "onnxslim": ("train", "onnxslim"),
    "sklearn": ("train", "scikit-learn"),
    "matplotlib": ("plots", "matplotlib"),
    "openvino": ("openvino", "openvino"),
    "tensorrt": ("trt", "tensorrt"),
    "cuda": ("trt", "cuda-python"),
    "pycuda": ("trt", "pycuda"),
    "onnxruntime": ("cpu-wheels", "onnxruntime"),
    "cv2": ("cpu-wheels", "opencv-python-headless"),
    "onnx": (None, "onnx"),
    "numpy": (None, "numpy"),
    "yaml": (None, "pyyaml"),
    "pydicom": ("dicom", "pydicom"),
    "pynetdicom": ("dicom", "pynetdicom"),
    "reportlab": ("report", "reportlab"),
    "uvicorn": ("serve", "uvicorn"),
    "selenium": ("dev", "selenium"),
    "skimage": ("dev", "scikit-image"),
    "tritonclient": ("dev", "tritonclient[grpc]"),
}

# The command being run (``export``, ``eval``): set by the CLI, named in the messages.
_COMMAND: list[str] = []


def set_command(name: str | None) -> None:
    """Record the running command, so a missing module names what needed it."""
    _COMMAND[:] = [name] if name else []


def _jetson_hint(module: str) -> str | None:
    """On aarch64 (Jetson) some modules come from JetPack or NVIDIA, never from PyPI."""
    import platform

    if platform.machine() != "aarch64":
        return None
    if module == "tensorrt":
        return (
            "on Jetson TensorRT comes with JetPack (sudo apt install nvidia-jetpack; create the "
            "venv with --system-site-packages), not from pip"
        )
    if module == "cv2":
        return (
            "on Jetson use JetPack's OpenCV with GStreamer (sudo apt install python3-opencv; "
            "venv with --system-site-packages); other ARM boards: "
            "pip install 'fundus-edge[cpu-wheels]'"
        )
    if module == "onnxruntime":
        return (
            "on Jetson install NVIDIA's onnxruntime-gpu wheel for your JetPack; other ARM boards: "
            "pip install 'fundus-edge[cpu-wheels]'"
        )
    if module == "pytorch_grad_cam":
        return (
            "pip install --no-deps grad-cam ttach (on aarch64 the train extra leaves grad-cam out: "
            "it requires PyPI's opencv-python, which would shadow JetPack's OpenCV)"
        )
    return None


def missing_dependency_message(
    module: str, purpose: str = "", detail: str = "", extra: str | None = None
) -> str:
    """One line: which module is missing, what needed it, and how to install it.

    Args:
        module: the import name that failed (``"torch"``, ``"pytorch_grad_cam.utils"``).
        purpose: what it is needed for (``"exporting a checkpoint"``).
        detail: the ImportError's own text; shown when it says more than "No module named".
        extra: the extra that brings a module :data:`OPTIONAL_MODULES` does not list.
    """
    top = module.split(".")[0]
    table_extra, dist = OPTIONAL_MODULES.get(top, (extra, top))
    who = f"fundus-edge {_COMMAND[0]}" if _COMMAND else "fundus-edge"
    why = f" for {purpose}" if purpose else ""
    hint = _jetson_hint(top)
    if hint is None:
        hint = (
            f"pip install 'fundus-edge[{table_extra}]'"
            if table_extra
            else f"pip install '{dist}' (a dependency of fundus-edge itself: the install is "
            "incomplete)"
        )
    detail = detail.strip().splitlines()[0] if detail.strip() else ""
    plain = ("No module named", "import of ")  # says nothing the message does not
    said = f" ({detail})" if detail and not detail.startswith(plain) else ""
    return f"{who} needs '{top}'{why}, which is not installed{said}; install it with: {hint}"


def require(module: str, extra: str | None = None, purpose: str = ""):
    """Import an optional dependency or raise a clear :class:`MissingDependencyError`.

    The one way optional modules are imported where a command needs them (MONAI's
    ``optional_import`` is the model): the message names the module, the command that needed
    it and the extra that brings it (from :data:`OPTIONAL_MODULES`).

    Args:
        module: importable module name, e.g. ``"torch"`` or ``"onnxruntime.quantization"``;
            also one of ours that imports an optional module (the message then names that).
        extra: the extra for a module the table does not list.
        purpose: what it is needed for, for the message.

    Returns:
        The imported module.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        # The module that was really missing (torch, when a module of ours imports it).
        missing = getattr(exc, "name", None) or module
        if missing.split(".")[0] not in OPTIONAL_MODULES:
            missing = module
        raise MissingDependencyError(
            missing_dependency_message(missing, purpose, str(exc), extra)
        ) from exc


def missing_module_of(exc: BaseException) -> str | None:
    """The optional module an ``ImportError`` is about, or None when it is not one of ours.

    The CLI's last line of defence: an import that did not go through :func:`require`
    still ends as exit 3 naming the extra, never as an internal error.
    """
    if not isinstance(exc, ImportError):
        return None
    name = getattr(exc, "name", None)
    if name is None:  # `raise ImportError("...")` inside a package: find a module name in it
        import re

        m = re.search(r"['\"]?([A-Za-z_][\w.]*)['\"]?", str(exc))
        name = m.group(1) if m else None
    if name and name.split(".")[0] in OPTIONAL_MODULES:
        return name.split(".")[0]
    return None


def require_all(modules: list[tuple[str, str]]) -> None:
    """Import several optional modules before any work: ``[(module, purpose), ...]``.

    A command checks everything its plan needs up front, so a missing package is one line
    (exit 3) before minutes of work, not after. The first missing one raises
    :class:`MissingDependencyError`.
    """
    for module, purpose in modules:
        require(module, purpose=purpose)
