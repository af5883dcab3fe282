"""Several processes under `torchrun`: who am I, which shards are mine, and the few collectives a corpus run needs.

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK (and MASTER_ADDR/PORT). The default process group uses gloo on
the CPU and NCCL on CUDA; the run's own coordination (one broadcast, one barrier, one gather, all of small
Python objects) goes through a separate gloo group, so that it works on either device and its timeout can
cover a rank that has much more left to do than the others.
"""

from __future__ import annotations

import heapq
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from attattr_fast.errors import AttAttrError

log = logging.getLogger(__name__)

# A barrier waits for the slowest rank; shards are balanced, but a resumed run can leave one rank far behind.
COORDINATION_TIMEOUT = timedelta(hours=24)


@dataclass
class DistContext:
    """This process's place in the run. A single process is world_size 1 with no process group."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    backend: str | None = None
    _group: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if self.world_size == 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self._group)
        return box[0]

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier(group=self._group)

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj` on rank 0 (in rank order); None on the other ranks."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0, group=self._group)
        return out

    def close(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise AttAttrError(f"environment variable {name}={value!r} is not an integer") from None


def from_environment(device_type: str) -> DistContext:
    """The context torchrun describes in the environment; starts the process group when WORLD_SIZE > 1.

    Args:
        device_type: "cuda" (NCCL default group, this process on cuda:LOCAL_RANK) or "cpu" (gloo).
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise AttAttrError(f"RANK={rank} does not fit WORLD_SIZE={world_size}")
    if world_size == 1:
        return DistContext()
    import torch.distributed as dist

    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        visible = torch.cuda.device_count()
        if visible == 1:
            local_rank = 0  # the launcher gave each rank its own GPU (CUDA_VISIBLE_DEVICES)
        elif local_rank >= visible:
            raise AttAttrError(f"LOCAL_RANK={local_rank} but only {visible} CUDA devices are visible")
        torch.cuda.set_device(local_rank)
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise AttAttrError(f"WORLD_SIZE={world_size} but {' and '.join(missing)} unset: start the run with torchrun")
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=COORDINATION_TIMEOUT)
    group = dist.new_group(backend="gloo", timeout=COORDINATION_TIMEOUT) if backend != "gloo" else dist.group.WORLD
    log.info("rank %d of %d (local rank %d, %s)", rank, world_size, local_rank, backend)
    return DistContext(world_size, rank, local_rank, backend, group)


def assign(costs: list[float], world_size: int) -> list[list[int]]:
    """Split items with the given costs over `world_size` ranks, most expensive first to the least loaded rank.

    Returns each rank's item positions, ascending. Deterministic: every rank computes the same split.
    """
    shares: list[list[int]] = [[] for _ in range(world_size)]
    heap = [(0.0, r) for r in range(world_size)]
    for item in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, r = heapq.heappop(heap)
        shares[r].append(item)
        heapq.heappush(heap, (load + costs[item], r))
    return [sorted(s) for s in shares]
