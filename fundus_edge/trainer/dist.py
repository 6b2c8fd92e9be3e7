"""Devices and torchrun: the process group, SyncBatchNorm, and the collectives the loop needs.

Launched by ``torchrun`` (env ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``) every helper here talks
to the other ranks; in a single process each is a no-op returning its input, so the loop
calls them unconditionally.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from fundus_edge.errors import UserError
from fundus_edge.log import get_logger

__all__ = ["Dist", "init_distributed", "resolve_device", "sync_batchnorm"]

log = get_logger("train")


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> CUDA when available else CPU; ``cuda`` without CUDA is a user error."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            built = torch.version.cuda or "no CUDA"
            raise UserError(
                f"--device {spec}: CUDA is not available here (torch {torch.__version__}, "
                f"built with {built}); use --device cpu"
            )
        return torch.device(spec)
    if spec == "cpu":
        return torch.device("cpu")
    raise UserError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N")


@dataclass
class Dist:
    """This process's place in the job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        """Rank 0: the one that validates, logs and writes the run directory."""
        return self.rank == 0

    def all_true(self, flag: bool) -> bool:
        """``flag`` on every rank (a MIN all-reduce) so all ranks take the same branch."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return bool(t.item() > 0)

    def any_true(self, flag: bool) -> bool:
        """``flag`` on any rank (a SUM all-reduce): one rank's Ctrl-C stops them all."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch.distributed.all_reduce(t)
        return bool(t.item() > 0)

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks, in float64."""
        if not self.enabled:
            return values
        t = torch.tensor(values, device=self.device, dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        """Wait for every rank (no-op in one process)."""
        if self.enabled:
            torch.distributed.barrier()

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` in DistributedDataParallel (itself in one process).

        DDP registers the parameters that need gradients when it is built: wrap again when
        freezing changes them. Unused parameters are allowed: the plain warm-up epochs never
        touch the enhanced view's graph.
        """
        if not self.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            module,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=True,
        )


def init_distributed(device_spec: str) -> Dist:
    """The process group under torchrun (NCCL on CUDA, gloo on CPU), else a single process.

    Raises:
        UserError: CUDA requested but absent, or a malformed ``device_spec``.
    """
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return Dist(device=resolve_device(device_spec))
    import torch.distributed as dist

    d = Dist(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), True)
    device = resolve_device(device_spec)
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    d.device = device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return d


def sync_batchnorm(ensemble: nn.Module, dist_: Dist) -> nn.Module:
    """SyncBatchNorm under DDP on CUDA; on CPU (gloo) torch has no SyncBatchNorm kernel."""
    if not dist_.enabled or not any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in ensemble.modules()
    ):
        return ensemble
    if dist_.device.type != "cuda":
        if dist_.main:
            log.info(
                "BatchNorm statistics stay per process: SyncBatchNorm needs CUDA (device %s)",
                dist_.device,
            )
        return ensemble
    # In place below the root: module names, and so checkpoint keys, do not change.
    ensemble = nn.SyncBatchNorm.convert_sync_batchnorm(ensemble)
    if dist_.main:
        log.info(
            "BatchNorm layers converted to SyncBatchNorm across %d processes",
            dist_.world_size,
        )
    return ensemble
