"""Several processes under ``torchrun``: the process group, the shards, and errors every rank agrees on.

``torchrun --nproc-per-node K -m isdelta.run cfg.yaml`` starts K copies of the program with
``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` set. :func:`ranks` joins them into one
``torch.distributed`` process group, chosen for the machine: ``gloo`` without CUDA, and
``cpu:gloo,cuda:nccl`` with it (tensors on a GPU travel by NCCL, pickled objects by gloo), each
rank on ``cuda:LOCAL_RANK``. Without ``torchrun`` (no ``WORLD_SIZE``, or 1) nothing is initialised
and every call below is the one-process case.

The ranks meet only at :meth:`Ranks.agree` (and inside the collectives of the update step). A
failure on one rank is carried to the others there, so every rank stops with the same exit code
and one message is printed, by the lowest rank that had it::

    rank 0:  work ─ ok ──────────┐
    rank 1:  work ─ ConfigError ─┼─ all_gather (ok | error) ─▶ rank 1 prints its error, exit 2
    rank 2:  work ─ ok ──────────┘                             ranks 0, 2 exit 2 quietly

A rank that dies outright (killed, out of memory) ends the job through ``torchrun``, which stops
the other workers. The group's timeout is long (:data:`TIMEOUT`): ranks legitimately wait for
each other while a longer shard samples or scores.
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

from isdelta.program.errors import ExitCode, ProgramError

__all__ = ["TIMEOUT", "PeerFailed", "Ranks", "is_root", "leave", "ranks", "say", "split"]

T = TypeVar("T")
TIMEOUT = datetime.timedelta(hours=8)  # the longest one rank may wait for another at a meeting


class PeerFailed(ProgramError):
    """Another rank failed (its message is printed by that rank): this one stops quietly."""

    quiet = True


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ``torchrun`` workers.

    Attributes
    ----------
    rank, world, local_rank : int
        0, 1, 0 for one process.
    backend : str or None
        The process group's backend (None for one process).
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def root(self) -> bool:
        """Rank 0: the one that writes the report and prints the summary."""
        return self.rank == 0

    def device(self, configured: str, key: str = "model") -> str:
        """The device this rank puts a model on: ``cuda`` becomes ``cuda:LOCAL_RANK``.

        An explicit ``cuda:N`` with several ranks would put every rank on one GPU: refused.
        """
        if self.world == 1 or configured in ("cpu", "mps"):
            return configured
        kind, _, index = configured.partition(":")
        if index:
            raise ProgramError(
                f"{key}.device: {configured} with {self.world} torchrun processes puts every rank on one device",
                f"each rank takes {kind}:LOCAL_RANK by itself",
                f"set {key}.device: {kind}",
            )
        return f"{kind}:{self.local_rank}"

    def gather(self, obj: T) -> list[T]:
        """``[obj of rank 0, …]`` on every rank (``[obj]`` for one process)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def gather_to_root(self, obj: T) -> list[T] | None:
        """``[obj of rank 0, …]`` on rank 0, None on the others (large payloads travel once)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world if self.root else None
        dist.gather_object(obj, out, dst=0)
        return out

    def agree(self, work: Callable[[], T]) -> T:
        """Run ``work()`` here, then meet the other ranks: return its result when every rank
        succeeded, else raise on every rank (see the module doc).

        A collective: every rank must call it at the same point of the program.
        """
        if self.world == 1:
            return work()
        try:
            result, failure = work(), None
        except Exception as e:  # carried to the others; KeyboardInterrupt is not caught
            result, failure = None, e
        status = None if failure is None else (str(failure), int(getattr(failure, "code", ExitCode.UNEXPECTED)))
        everyone = self.gather(status)
        failed = [(r, s) for r, s in enumerate(everyone) if s is not None]
        if not failed:
            return result  # type: ignore[return-value]
        if failure is None:
            first, (message, code) = failed[0]
            raise PeerFailed(f"rank {first} of {self.world} stopped: {message}", code=code)
        if any(s[0] == status[0] for r, s in failed if r < self.rank):  # a lower rank prints it
            failure.quiet = True  # type: ignore[attr-defined]
        raise failure

    def close(self) -> None:
        """Leave the process group (the program's last step)."""
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def ranks() -> Ranks:
    """This process's :class:`Ranks`, joining the ``torchrun`` process group on the first call.

    Ranks other than 0 stop announcing stages and drawing progress bars (``TQDM_DISABLE``), so
    the terminal shows one run, not K interleaved ones.
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world == 1:
        return Ranks()
    import torch
    import torch.distributed as dist

    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and dist.is_nccl_available()
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local % torch.cuda.device_count())
        try:
            dist.init_process_group(backend, timeout=TIMEOUT)
        except (RuntimeError, ValueError) as e:
            raise ProgramError(
                f"torchrun: rank {rank} of {world} could not join the process group",
                str(e).splitlines()[0] if str(e) else type(e).__name__,
                "start the program with torchrun --nproc-per-node K -m isdelta.run CONFIG (or without torchrun)",
            ) from None
    if rank:
        os.environ["TQDM_DISABLE"] = "1"
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" passes its own ``disable``
    return Ranks(rank, dist.get_world_size(), local, str(dist.get_backend()))  # a caller's own group: its backend


def split(n: int, world: int, rank: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous share ``[lo, hi)`` of ``n`` items in order; shares differ by one
    at most, the larger ones first (rank order is item order, so gathering in rank order
    restores the one-process order)."""
    q, r = divmod(n, world)
    lo = rank * q + min(rank, r)
    return lo, lo + q + (rank < r)


def leave(code: int) -> NoReturn:
    """End the process with ``code`` (a program's ``__main__``).

    Under ``torchrun`` the worker ends with ``os._exit`` once its output is flushed: every result
    is on disk and the process group is gone, but the interpreter's teardown now and then aborts
    in a C++ thread of the gloo backend ("terminate called without an active exception", exit
    −6; one run in ten on a 2-core machine, torch 2.13), and torchrun would report a finished
    run as failed.
    """
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def say(message: str) -> None:
    """A progress line on stderr, from rank 0 alone under torchrun."""
    if is_root():
        print(message, file=sys.stderr, flush=True)


def is_root() -> bool:
    """Whether this process is rank 0 of a ``torchrun`` job, or runs alone (for output only)."""
    return int(os.environ.get("RANK", "0") or 0) == 0 or int(os.environ.get("WORLD_SIZE", "1") or 1) == 1
