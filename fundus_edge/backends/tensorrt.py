"""TensorRT backend: ``.engine`` / ``.plan`` files through the TensorRT 10 name-based I/O API.

Engines are tied to the GPU architecture and TensorRT version they were built with, so
a failed deserialisation names both sides of the mismatch. Metadata comes from the
sidecar ``<engine>.json`` written by export. CUDA memory and streams go through
cuda-python (``cuda.bindings.runtime`` or the older ``cuda.cudart``) or pycuda, whichever
is installed; everything here is imported when an engine is loaded, never at import time.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from fundus_edge.artifact import read_metadata
from fundus_edge.backends.base import INPUT_NAME, Backend
from fundus_edge.errors import MissingDependencyError, UserError, require

__all__ = ["CudaRuntime", "TensorRTBackend", "open_cuda"]


class CudaRuntime(ABC):
    """The few CUDA calls the backend needs, over whichever Python binding is installed.

    Pointers and the stream are plain ints (what ``set_tensor_address`` and
    ``execute_async_v3`` take).
    """

    name: ClassVar[str] = ""
    stream: int

    @abstractmethod
    def malloc(self, nbytes: int) -> int: ...

    @abstractmethod
    def free(self, ptr: int) -> None: ...

    @abstractmethod
    def htod(self, ptr: int, host: np.ndarray) -> None:
        """Copy a contiguous host array to device memory on the stream."""

    @abstractmethod
    def dtoh(self, host: np.ndarray, ptr: int) -> None:
        """Copy device memory into a contiguous host array on the stream."""

    @abstractmethod
    def synchronize(self) -> None: ...

    def capture_graph(self, launch: Callable[[], None]) -> Any:
        """Record what ``launch`` enqueues on the stream as a replayable CUDA graph."""
        raise UserError(f"CUDA graphs need cuda-python; the {self.name} binding cannot capture")

    def launch_graph(self, graph: Any) -> None:
        raise UserError(f"CUDA graphs need cuda-python; the {self.name} binding cannot replay")

    def destroy_graph(self, graph: Any) -> None:  # noqa: B027  (nothing to free by default)
        """Release a graph from :meth:`capture_graph`."""

    def device_name(self) -> str:
        return "unknown GPU"

    def close(self) -> None:  # noqa: B027  (bindings without a stream to free)
        """Release the stream (and context, where the binding owns one)."""

    def scope(self) -> Any:
        """Context manager making this runtime's CUDA context current (a no-op by default)."""
        import contextlib

        return contextlib.nullcontext()


class _CudaPython(CudaRuntime):
    """NVIDIA's cuda-python runtime bindings: every call returns ``(err, *values)``."""

    name = "cuda-python"

    def __init__(self, cudart: Any) -> None:
        self._rt = cudart
        (stream,) = self._call(cudart.cudaStreamCreate())
        self.stream = int(stream)

    def _call(self, result: Any) -> list[Any]:
        err, *values = result if isinstance(result, tuple) else (result,)
        if err != self._rt.cudaError_t.cudaSuccess:
            _, text = self._rt.cudaGetErrorString(err)
            raise UserError(
                f"CUDA error {int(err)}: {text.decode() if isinstance(text, bytes) else text}"
            )
        return values

    def malloc(self, nbytes: int) -> int:
        return int(self._call(self._rt.cudaMalloc(nbytes))[0])

    def free(self, ptr: int) -> None:
        self._call(self._rt.cudaFree(ptr))

    def htod(self, ptr: int, host: np.ndarray) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call(self._rt.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes, kind, self.stream))

    def dtoh(self, host: np.ndarray, ptr: int) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call(self._rt.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes, kind, self.stream))

    def synchronize(self) -> None:
        self._call(self._rt.cudaStreamSynchronize(self.stream))

    def capture_graph(self, launch: Callable[[], None]) -> Any:
        rt = self._rt
        mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self._call(rt.cudaStreamBeginCapture(self.stream, mode))
        try:
            launch()
        finally:
            (graph,) = self._call(rt.cudaStreamEndCapture(self.stream))
        (exec_graph,) = self._call(rt.cudaGraphInstantiate(graph, 0))
        return (graph, exec_graph)

    def launch_graph(self, graph: Any) -> None:
        self._call(self._rt.cudaGraphLaunch(graph[1], self.stream))

    def destroy_graph(self, graph: Any) -> None:
        self._call(self._rt.cudaGraphExecDestroy(graph[1]))
        self._call(self._rt.cudaGraphDestroy(graph[0]))

    def device_name(self) -> str:
        (dev,) = self._call(self._rt.cudaGetDevice())
        (props,) = self._call(self._rt.cudaGetDeviceProperties(dev))
        name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else props.name
        return f"{name.rstrip(chr(0))} (sm {props.major}.{props.minor})"

    def close(self) -> None:
        if self.stream:
            self._call(self._rt.cudaStreamDestroy(self.stream))
            self.stream = 0


class _PyCuda(CudaRuntime):
    """pycuda's driver API; it owns a context that must be current in the calling thread."""

    name = "pycuda"

    def __init__(self, driver: Any) -> None:
        self._cuda = driver
        driver.init()
        self._device = driver.Device(0)
        self._ctx = self._device.make_context()
        try:
            self._stream_obj = driver.Stream()
            self.stream = int(self._stream_obj.handle)
            self._allocs: dict[int, Any] = {}
        finally:
            self._ctx.pop()

    def scope(self) -> Any:
        import contextlib

        @contextlib.contextmanager
        def current():
            self._ctx.push()
            try:
                yield
            finally:
                self._ctx.pop()

        return current()

    def malloc(self, nbytes: int) -> int:
        alloc = self._cuda.mem_alloc(nbytes)
        self._allocs[int(alloc)] = alloc
        return int(alloc)

    def free(self, ptr: int) -> None:
        self._allocs.pop(ptr).free()

    def htod(self, ptr: int, host: np.ndarray) -> None:
        self._cuda.memcpy_htod_async(ptr, host, self._stream_obj)

    def dtoh(self, host: np.ndarray, ptr: int) -> None:
        self._cuda.memcpy_dtoh_async(host, ptr, self._stream_obj)

    def synchronize(self) -> None:
        self._stream_obj.synchronize()

    def device_name(self) -> str:
        major, minor = self._device.compute_capability()
        return f"{self._device.name()} (sm {major}.{minor})"

    def close(self) -> None:
        if self._ctx is not None:
            self._ctx.detach()
            self._ctx = None


def open_cuda() -> CudaRuntime:
    """The first CUDA binding that imports: cuda-python (new, then old layout), then pycuda."""
    import importlib

    for module, cls in (
        ("cuda.bindings.runtime", _CudaPython),
        ("cuda.cudart", _CudaPython),
        ("pycuda.driver", _PyCuda),
    ):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        return cls(mod)
    from fundus_edge.doctor import cuda_info
    from fundus_edge.errors import missing_dependency_message

    # The bindings must match the CUDA installed here: doctor knows which (cuda-python 12.x
    # for CUDA 12, 13.x for CUDA 13).
    advice = cuda_info().get("advice") or ""
    base = missing_dependency_message("cuda", "running TensorRT engines (cuda-python or pycuda)")
    raise MissingDependencyError(f"{base}; for this machine: {advice}" if advice else base)


class TensorRTBackend(Backend):
    """A serialized TensorRT engine run with name-based I/O (TensorRT >= 10).

    Args:
        path: the ``.engine`` / ``.plan`` file; its metadata is in ``<path>.json``.
        cuda_graph: capture one CUDA graph per batch size and replay it (saves the
            per-launch CPU cost on small Jetsons); needs cuda-python.
    """

    name: ClassVar[str] = "tensorrt"
    suffixes: ClassVar[tuple[str, ...]] = (".engine", ".plan")
    options: ClassVar[tuple[str, ...]] = ("cuda_graph",)

    def __init__(self, path: Path, cuda_graph: bool = False) -> None:
        self.path = Path(path)
        self.metadata = read_metadata(self.path)  # the sidecar; checks the file exists too
        trt = require("tensorrt", purpose="running TensorRT engines")
        major = int(str(trt.__version__).split(".")[0])
        if major < 10:
            raise UserError(
                f"{self.path}: TensorRT {trt.__version__} is too old; the runtime uses the "
                "TensorRT 10 name-based I/O API (JetPack 6 or newer)"
            )
        self._trt = trt
        self._cuda = open_cuda()
        self._cuda_graph = cuda_graph
        self._buffers: dict[str, int] = {}
        self._graphs: dict[int, Any] = {}
        self._context = None
        self._engine = None
        try:
            with self._cuda.scope():
                self._load_engine()
                self._bind()
        except BaseException:
            self.close()
            raise
        self.device = f"TensorRT {trt.__version__} on {self._device_name()}"

    def _device_name(self) -> str:
        try:
            with self._cuda.scope():
                return self._cuda.device_name()
        except Exception:  # the name is only for messages; never fail a load on it
            return "unknown GPU"

    def _load_engine(self) -> None:
        trt = self._trt
        logger = _collecting_logger(trt)
        self._runtime = trt.Runtime(logger)
        engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if engine is None:
            built = self.metadata.get("versions", {}).get("tensorrt", "an unrecorded version")
            built_on = self.metadata.get("device") or self.metadata.get("versions", {}).get("gpu")
            where = f" on {built_on}" if built_on else ""
            why = "; ".join(logger.errors[-2:]) or "no reason given"
            raise UserError(
                f"{self.path}: TensorRT {trt.__version__} on {self._device_name()} cannot load this "
                f"engine (built with TensorRT {built}{where}): {why}. Engines are tied to the GPU and "
                "TensorRT version; rebuild it on this device from the .onnx with fundus-edge export"
            )
        self._engine = engine

    def _bind(self) -> None:
        """Check the engine's I/O against the contract and allocate device buffers once."""
        trt, engine = self._trt, self._engine
        io: dict[str, tuple[bool, np.dtype, tuple[int, ...]]] = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            io[name] = (is_input, dtype, tuple(engine.get_tensor_shape(name)))
        inputs = [n for n, (is_in, _, _) in io.items() if is_in]
        if inputs != [INPUT_NAME]:
            raise UserError(f"{self.path}: expected one input '{INPUT_NAME}', engine has {inputs}")
        _, in_dtype, in_shape = io[INPUT_NAME]
        s = self.input_size
        if in_dtype != np.uint8:
            raise UserError(
                f"{self.path}: input '{INPUT_NAME}' must be uint8, engine has {in_dtype}"
            )
        if len(in_shape) != 4 or tuple(in_shape[1:]) != (s, s, 3):
            raise UserError(
                f"{self.path}: input '{INPUT_NAME}' has shape {list(in_shape)}, "
                f"metadata input_size {s} needs [N, {s}, {s}, 3]"
            )
        self._outputs = [n for n, (is_in, _, _) in io.items() if not is_in]
        self._check_outputs(self._outputs)
        self._dtypes = {n: dt for n, (_, dt, _) in io.items()}
        # Dynamic batch: the optimisation profile's max; static: the built batch.
        if in_shape[0] < 0:
            self.max_batch = int(engine.get_tensor_profile_shape(INPUT_NAME, 0)[2][0])
        else:
            self.max_batch = int(in_shape[0])
        self._context = engine.create_execution_context()
        self._context.set_input_shape(INPUT_NAME, (self.max_batch, s, s, 3))
        for name in [INPUT_NAME, *self._outputs]:
            shape = tuple(self._context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise UserError(f"{self.path}: output '{name}' has unresolved shape {list(shape)}")
            nbytes = math.prod(shape) * self._dtypes[name].itemsize
            self._buffers[name] = self._cuda.malloc(max(nbytes, 1))
            self._context.set_tensor_address(name, self._buffers[name])

    def _infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        # Batches larger than the engine's profile run in chunks; results are concatenated.
        parts = [
            self._infer_chunk(batch[i : i + self.max_batch])
            for i in range(0, len(batch), self.max_batch)
        ]
        if len(parts) == 1:
            return parts[0]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _infer_chunk(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        n = len(batch)
        ctx = self._context
        with self._cuda.scope():
            ctx.set_input_shape(INPUT_NAME, batch.shape)
            out = {
                name: np.empty(tuple(ctx.get_tensor_shape(name)), self._dtypes[name])
                for name in self._outputs
            }
            self._cuda.htod(self._buffers[INPUT_NAME], batch)
            self._execute(n)
            for name, host in out.items():
                self._cuda.dtoh(host, self._buffers[name])
            self._cuda.synchronize()
        # FP16 I/O engines hand back half floats; the contract is float32.
        return {k: v.astype(np.float32, copy=False) for k, v in out.items()}

    def _execute(self, n: int) -> None:
        if not self._cuda_graph:
            if not self._context.execute_async_v3(self._cuda.stream):
                raise UserError(f"{self.path}: TensorRT execution failed (batch {n})")
            return
        if n not in self._graphs:
            # One eager run first: TensorRT allocates lazily and must not do so while capturing.
            if not self._context.execute_async_v3(self._cuda.stream):
                raise UserError(f"{self.path}: TensorRT execution failed (batch {n})")
            self._cuda.synchronize()
            self._graphs[n] = self._cuda.capture_graph(
                lambda: self._context.execute_async_v3(self._cuda.stream)
            )
        self._cuda.launch_graph(self._graphs[n])

    def close(self) -> None:
        cuda = getattr(self, "_cuda", None)
        if cuda is None:
            return
        with cuda.scope():
            for graph in self._graphs.values():
                cuda.destroy_graph(graph)
            self._graphs.clear()
            for ptr in self._buffers.values():
                cuda.free(ptr)
            self._buffers.clear()
            self._context = None
            self._engine = None
        cuda.close()
        self._cuda = None


def _collecting_logger(trt: Any) -> Any:
    """A TensorRT logger that keeps error messages, so a failed load can say why."""

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(str(msg).strip())

    return _Logger()
