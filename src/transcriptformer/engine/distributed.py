"""Several inference processes: one per GPU, or several CPU processes.

The processes exchange no outputs. They share the one pass over the inputs' counts that checks them
(:func:`shared_scan`), each runs its share of the work units and writes their outputs to disk, then all meet at a
barrier (a gloo process group, which needs no GPU), and rank 0 merges the units in input order into the output.
They are started in one of two ways:

* ``transcriptformer inference --num-gpus N``: :func:`spawn` starts N processes with ``torch.multiprocessing``.
* ``torchrun --nproc-per-node N $(which transcriptformer) inference ...``: torchrun starts them, and
  :func:`torchrun_rank` reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` from the environment.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from transcriptformer.console import current_wording, verbosity
from transcriptformer.data.sources import CountReader
from transcriptformer.data.tokenize import CountScan, CountScanner, Entry, scan_counts
from transcriptformer.errors import UserError

# How long a process that has finished its share waits for the slowest one at the final barrier.
BARRIER_TIMEOUT = timedelta(hours=24)


@dataclass(frozen=True)
class Rank:
    """A process' place among the inference processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Whether this process merges the outputs and reports."""
        return self.rank == 0


def torchrun_rank() -> Rank | None:
    """The rank torchrun (or any launcher that sets ``RANK`` and ``WORLD_SIZE``) gave this process, if any."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    return Rank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_world_size(device: torch.device, num_gpus: int) -> int:
    """Number of processes for ``--num-gpus`` on ``device``.

    On CUDA, ``-1`` means every visible GPU; on CPU, ``num_gpus`` processes (``-1``: one); MPS has one device.
    """
    if device.type == "cuda":
        available = torch.cuda.device_count()
        wanted = available if num_gpus == -1 else num_gpus
        if wanted > available:
            raise ValueError(f"`num_gpus={num_gpus}` asks for {wanted} GPUs but {available} are visible")
        return wanted
    if device.type == "mps":
        if num_gpus > 1:
            raise ValueError(f"`num_gpus={num_gpus}`: an MPS device runs one process")
        return 1
    return 1 if num_gpus == -1 else num_gpus


def device_of(rank: Rank, device: torch.device) -> torch.device:
    """The device of one process: ``cuda:<local rank>`` when several processes share a machine's GPUs."""
    if device.type == "cuda" and rank.world_size > 1:
        return torch.device("cuda", rank.local_rank)
    return device


@contextmanager
def process_group(rank: Rank, init_method: str | None) -> Iterator[None]:
    """Join the processes' gloo group for the duration of the block (nothing to do for a single process)."""
    if rank.world_size == 1:
        yield
        return
    dist.init_process_group(
        "gloo", init_method=init_method, rank=rank.rank, world_size=rank.world_size, timeout=BARRIER_TIMEOUT
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def barrier(rank: Rank) -> None:
    """Wait until every process has reached this point."""
    if rank.world_size > 1:
        dist.barrier()


def shared_scan(rank: Rank) -> CountScanner:
    """The pass over an input's counts (:func:`~transcriptformer.data.tokenize.scan_counts`) shared by the processes.

    Each process reads every ``world_size``-th block of cells, and the processes add up their statistics (each
    cell's come from the one process that read it, so the sums are exact): every process gets the statistics of a
    single pass, while the input is read once in all, not once per process. Call it inside :func:`process_group`.
    """
    if rank.world_size == 1:
        return scan_counts

    def scan(reader: CountReader, columns: np.ndarray, infinite_to: float | None, per_cell: bool) -> CountScan:
        blocks = slice(rank.rank, None, rank.world_size)
        own = scan_counts(reader, columns, infinite_to, blocks=blocks, per_cell=per_cell)
        if per_cell:
            for values in (own.totals, own.expressed, own.invalid):
                dist.all_reduce(torch.from_numpy(values))  # in place, into the numpy arrays
        counted = ("n_invalid", "n_invalid_cells", "n_empty", "n_infinite", "n_stored", "non_integer")
        sums = torch.tensor([getattr(own, name) for name in counted], dtype=torch.int64)
        dist.all_reduce(sums)
        for name, value in zip(counted, sums.tolist(), strict=True):
            setattr(own, name, value)
        firsts = [None] * rank.world_size
        dist.all_gather_object(firsts, (own.first_invalid, own.first_non_integer))
        own.first_invalid, own.first_non_integer = (_first([f[i] for f in firsts]) for i in range(2))
        return own

    return scan


def _first(entries: list[Entry | None]) -> Entry | None:
    """The entry of the lowest row among the processes' (``None`` when none found one)."""
    return min((e for e in entries if e is not None), key=lambda e: e.row, default=None)


def spawn(worker: Callable[..., None], world_size: int, *args) -> None:
    """Run ``worker(rank, init_method, *args)`` in ``world_size`` new processes on this machine and wait for them.

    Raises
    ------
    UserError
        When a process fails; the message ends with that process' error.
    """
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    try:
        spawned = (world_size, init_method, current_wording(), worker, args)
        mp.spawn(_run_spawned, args=spawned, nprocs=world_size, join=True)
    except mp.ProcessRaisedException as error:
        last_line = str(error).strip().splitlines()[-1]
        raise UserError(f"an inference process failed: {last_line}") from error


def _run_spawned(
    index: int,
    world_size: int,
    init_method: str,
    wording: Callable[[str], str],
    worker: Callable[..., None],
    args: tuple,
) -> None:
    # The command's --quiet / --verbose, inherited through the environment, and its wording of messages.
    with verbosity(wording=wording):
        worker(Rank(index, world_size, index), init_method, *args)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
