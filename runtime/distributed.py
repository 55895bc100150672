"""Tensor-parallel communication: the process group every rank joins, and the two
collectives the sharded model needs.

Megatron-LM style tensor parallelism (Shoeybi et al., "Megatron-LM", 2019, §3): a
column-parallel layer needs no communication, a row-parallel layer ends with an
all-reduce of its partial sums, and the vocab-parallel LM head gathers each rank's
slice of the logits to rank 0 (which samples).

The group is ``torch.distributed``'s default group: gloo on CPU, NCCL on CUDA. Its
rendezvous is a ``TCPStore`` that rank 0 opens on port 0 of the loopback address, so the
kernel picks a free port and two servers on one host never collide; the workers are
given that port.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Optional

import torch

#: How long a collective may wait for a peer before failing (seconds). A dead peer is
#: detected sooner: gloo raises "Connection closed by peer" as soon as its socket closes.
COLLECTIVE_TIMEOUT_S = 600.0

#: How long joining the group may take once every rank has loaded its shard (seconds).
RENDEZVOUS_TIMEOUT_S = 120.0


@dataclass
class TPGroup:
    """This process's place in the tensor-parallel group.

    Attributes:
        rank: 0 .. ``world_size - 1``; rank 0 runs the scheduler and sampler.
        world_size: ``--tensor-parallel-size``.
    """

    rank: int = 0
    world_size: int = 1

    @property
    def is_parallel(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` (any shape) over all ranks, in place; returns ``x``. No-op at size 1."""
        if self.world_size > 1:
            torch.distributed.all_reduce(x)
        return x

    def gather_to_first(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Concatenate every rank's ``x [N, C]`` along the last dim on rank 0.

        Returns:
            ``[N, world_size * C]`` on rank 0, None on the other ranks (they must still
            call this: it is a collective). At size 1, ``x`` itself.
        """
        if self.world_size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)] if self.rank == 0 else None
        torch.distributed.gather(x, parts, dst=0)
        return torch.cat(parts, dim=-1) if self.rank == 0 else None


def open_store(world_size: int, host: str = "127.0.0.1"):
    """Rank 0's rendezvous store on a kernel-chosen free port (read it from ``.port``)."""
    from torch.distributed import TCPStore

    return TCPStore(host, 0, world_size, True, timeout=datetime.timedelta(seconds=RENDEZVOUS_TIMEOUT_S),
                    wait_for_workers=False)


def init_group(rank: int, world_size: int, device: torch.device, port: int, store=None,
               host: str = "127.0.0.1") -> TPGroup:
    """Join the default process group (blocks until all ``world_size`` ranks have joined).

    Args:
        rank: this process's rank.
        world_size: number of ranks.
        device: ``cpu`` -> gloo; ``cuda`` -> NCCL.
        port: the rendezvous port rank 0's :func:`open_store` got.
        store: rank 0 passes its store; workers connect to ``host:port``.
    Raises:
        RuntimeError: a rank did not join within :data:`COLLECTIVE_TIMEOUT_S`.
    """
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    if store is None:
        store = dist.TCPStore(host, port, world_size, False, timeout=datetime.timedelta(seconds=RENDEZVOUS_TIMEOUT_S))
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout, **kwargs)
    return TPGroup(rank, world_size)


def destroy_group() -> None:
    """Leave the default process group if this process joined one (idempotent)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a peer already gone: nothing left to tear down cleanly
            pass
