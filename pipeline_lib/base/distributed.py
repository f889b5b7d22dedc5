"""Several processes on one job, as launched by `torchrun` (torch.distributed): who am I, which
share of the work is mine, and how the shares come back together.

torchrun starts one process per GPU (or several CPU processes) on each machine and tells each its
place in environment variables: RANK (0..WORLD_SIZE-1 over all machines), WORLD_SIZE, LOCAL_RANK
and LOCAL_WORLD_SIZE (on this machine). Outside torchrun a process is rank 0 of a world of one,
and everything here is a no-op. Rank 0 writes the outputs; when one process fails, torchrun stops
the others (so nothing waits forever on a dead peer).

- `Ranks.from_env`, `start`: a process's place, and the process group (gloo: CPU tensors, on any
  machine, enough for what the ranks exchange here; DDP's gradients pick their own backend).
- `batch_share`: a rank's contiguous run of whole batches, so every batch holds the same images as
  in a one-process run (the same numbers bit for bit on CPU, and the same row order).
- `gather_bytes`: each rank's file of rows, appended in rank order to rank 0's.
- `sum_over_ranks`: per-epoch sums and counts of the training loop added over all ranks, so that
  every rank reports the job's means; `unwrap`: the model inside DistributedDataParallel.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

CHUNK = 16 << 20  # bytes per message when rows travel to rank 0
TIMEOUT = timedelta(minutes=60)  # a peer that stops answering (torchrun normally stops all first)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the job's processes."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes outputs and shows progress."""
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Ranks:
        """From torchrun's variables (a world of one without them)."""
        env = os.environ
        return cls(
            int(env.get("RANK", 0)),
            int(env.get("WORLD_SIZE", 1)),
            int(env.get("LOCAL_RANK", 0)),
            int(env.get("LOCAL_WORLD_SIZE", 1)),
        )

    def threads(self) -> int:
        """CPU threads for this process: the machine's cores shared by its local processes."""
        return max(1, (os.cpu_count() or 1) // self.local_world)

    def share_cpu(self) -> None:
        """Under torchrun, set torch's thread count to this process's share of the cores
        (`threads`); one process keeps torch's own (OMP_NUM_THREADS where set)."""
        if self.world > 1:
            torch.set_num_threads(self.threads())


ONE_PROCESS = Ranks()


def start(backend: str = "gloo") -> Ranks:
    """This process's `Ranks`; under torchrun (WORLD_SIZE > 1) also joins the process group."""
    ranks = Ranks.from_env()
    if ranks.world > 1 and not dist.is_initialized():
        dist.init_process_group(backend, timeout=TIMEOUT)
    return ranks


def stop() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def batch_share(count: int, batch_size: int, ranks: Ranks) -> range:
    """The items (of `count`, in batches of `batch_size`) that `ranks.rank` handles: a contiguous
    run of whole batches, the batches spread as evenly as they go (ranks past the last batch get
    none). Concatenated in rank order, the shares are range(count)."""
    batches = -(-count // batch_size)
    first = batches * ranks.rank // ranks.world
    last = batches * (ranks.rank + 1) // ranks.world
    return range(min(count, first * batch_size), min(count, last * batch_size))


def all_gather(value, ranks: Ranks) -> list:
    """`value` (picklable, small) of every rank, in rank order."""
    if ranks.world == 1:
        return [value]
    values = [None] * ranks.world
    dist.all_gather_object(values, value)
    return values


def gather_bytes(path: Path, sizes: list[int], ranks: Ranks) -> None:
    """Append every other rank's file (its path on its own machine: `path`; their sizes in rank
    order: `sizes`) to rank 0's `path`, in rank order, through the process group in CHUNK-sized
    messages (ranks may be on machines that share no disk)."""
    if ranks.world == 1:
        return
    if ranks.main:
        with open(path, "ab") as sink:
            for source in range(1, ranks.world):
                for size in _chunks(sizes[source]):
                    buffer = torch.empty(size, dtype=torch.uint8)
                    dist.recv(buffer, src=source)
                    sink.write(buffer.numpy().tobytes())
    else:
        with open(path, "rb") as rows:
            for size in _chunks(sizes[ranks.rank]):
                dist.send(torch.frombuffer(bytearray(rows.read(size)), dtype=torch.uint8), dst=0)
    dist.barrier()


def sum_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """`values` added up over every rank (itself outside a process group); every rank must pass
    the same keys."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    total = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return dict(zip(values, total.tolist(), strict=True))


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model that DistributedDataParallel wraps (or `model` itself)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def _chunks(total: int) -> list[int]:
    return [min(CHUNK, total - start) for start in range(0, total, CHUNK)]
