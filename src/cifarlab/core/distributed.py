"""Several training processes (torchrun, DDP): who this process is, and the few collective
operations the pipeline needs.

One flag gates every side effect, as nanoGPT's `master_process` does: `world().main` (rank 0)
writes the run directory, logs to the console and to MLflow, plans the budget and decides
(early stopping, re-planning); the decisions reach the other ranks through `broadcast`. A
process started without torchrun is a world of one, and every function here is then a no-op.

Objects cross between processes as JSON in a byte tensor, never as pickles.
"""

from __future__ import annotations

import atexit
import json
import os
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from cifarlab.core.errors import UserError

# how long a collective waits for a process that is alive but silent (a dead process is noticed
# at once: its sockets close); longer than the longest rank-0-only stretch (the budget's timing)
TIMEOUT_S = float(os.environ.get("CIFARLAB_DIST_TIMEOUT", "600"))


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> np.ndarray:
        """This process's contiguous share of n items (the last shares may be one shorter)."""
        per = -(-n // self.size)
        return np.arange(self.rank * per, min(n, (self.rank + 1) * per))


def world() -> World:
    """This process's place, from torchrun's environment (a world of one without it)."""
    env = os.environ
    size = int(env.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    return World(
        int(env["RANK"]),
        size,
        int(env.get("LOCAL_RANK", "0")),
        int(env.get("LOCAL_WORLD_SIZE", "1")),
    )


def share(data):
    """This process's contiguous share of a dataset (anything with len() and .subset(index));
    all of it in a world of one."""
    w = world()
    return data.subset(w.shard(len(data))) if w.active else data


def init(device: torch.device) -> World:
    """Join the other processes (once; gloo on the CPU, nccl on CUDA with one GPU per process)."""
    w = world()
    if not w.active or dist.is_initialized():
        return w
    if device.type == "cuda":
        torch.cuda.set_device(w.local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=TIMEOUT_S))
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"rank {w.rank} could not join the other processes at {where} ({first}); "
            "check the rendezvous address and port"
        ) from None
    atexit.register(close, together=False)  # whatever ends the process (see `close`)
    return w


def local_device(device: torch.device) -> torch.device:
    """Under torchrun on CUDA, this process's own GPU."""
    if device.type == "cuda" and world().active:
        return torch.device("cuda", world().local_rank)
    return device


def broadcast(obj):
    """Rank 0's JSON-able `obj`, on every rank (what the others pass is ignored)."""
    if not dist.is_initialized():
        return obj
    device = _comm_device()
    if world().main:
        data = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8, device=device)
        size = torch.tensor([len(data)], dtype=torch.long, device=device)
    else:
        size = torch.zeros(1, dtype=torch.long, device=device)
    dist.broadcast(size, 0)
    if not world().main:
        data = torch.empty(int(size), dtype=torch.uint8, device=device)
    dist.broadcast(data, 0)
    return json.loads(bytes(data.cpu().tolist()).decode())


def from_main(array: np.ndarray | None) -> np.ndarray:
    """Rank 0's array on every rank (what the others pass is ignored)."""
    if not dist.is_initialized():
        return array
    shape, dtype = broadcast([list(array.shape), str(array.dtype)] if world().main else None)
    if world().main:
        t = torch.from_numpy(np.ascontiguousarray(array))
    else:
        t = torch.empty(shape, dtype=getattr(torch, dtype))
    t = t.to(_comm_device())
    dist.broadcast(t, 0)
    return t.cpu().numpy()


def all_sum(values: list[float]) -> list[float]:
    """The sum over ranks of each value (float64)."""
    if not dist.is_initialized():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def gather_rows(part: torch.Tensor | np.ndarray, n: int):
    """Every rank's `shard(n)` rows of an array, joined in order, on every rank."""
    if not dist.is_initialized():
        return part
    as_numpy = isinstance(part, np.ndarray)
    t = torch.from_numpy(part) if as_numpy else part
    per = -(-n // world().size)
    padded = t.new_zeros((per, *t.shape[1:]))
    padded[: len(t)] = t
    device = _comm_device()
    parts = [torch.empty_like(padded, device=device) for _ in range(world().size)]
    dist.all_gather(parts, padded.to(device))
    joined = torch.cat(parts)[:n].to(t.device)
    return joined.numpy() if as_numpy else joined


@torch.no_grad()
def sync_from_main(module: torch.nn.Module) -> None:
    """Give every rank rank 0's weights and buffers (e.g. the averaged model before it is
    validated, whose BatchNorm statistics each rank updated from its own share)."""
    if not dist.is_initialized():
        return
    for t in module.state_dict().values():
        if t.is_floating_point():
            dist.broadcast(t, 0)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def close(together: bool = True) -> None:
    """Leave the process group: `together` at the end of a run (rank 0 may still be writing
    the report), alone on an error. A process must not exit with the group still open: gloo's
    threads then abort the process at exit ("terminate called without an active exception",
    seen on a loaded machine), and torchrun reports a crash instead of the error."""
    if dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    return (
        torch.device("cuda", world().local_rank)
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )


def lost_peer(error: BaseException) -> bool:
    """Whether an error is a collective failing because another process stopped (nccl raises
    DistError; gloo a RuntimeError from its transport: "Connection reset by peer")."""
    if not dist.is_initialized():
        return False
    return isinstance(error, dist.DistError) or "gloo/transport" in str(error)
