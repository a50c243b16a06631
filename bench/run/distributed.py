"""One run split over several processes of one node: ``torchrun`` or ``accelerate launch``.

    torchrun --nproc-per-node 8 run.py model=... run.device=cuda ...

Both launchers start ``WORLD_SIZE`` copies of the command and give each ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` (PyTorch,
``torch.distributed.run``, "Environment variables"; ``accelerate launch --multi_gpu``
runs the same launcher). The harness reads those variables itself; it does not use
accelerate's ``PartialState``, which on a CPU without ``cpu=True`` lets every rank do
all the work.

What a run does with them (one code path, :mod:`bench.run.runner`):

* **Output directory.** Every rank runs the Hydra entry and composes its own config.
  Before that, the ranks agree on rank 0's launch time, which ``${launch_time:...}``
  in ``hydra.run.dir`` / ``hydra.sweep.dir`` (``conf/config.yaml``) formats, so all
  ranks name the same directory. Ranks > 0 write no ``.hydra/`` and no log file there
  (``hydra.output_subdir=null``, ``hydra/job_logging=stdout`` are added to their
  command line) and no run record.
* **Generation.** Each rank generates its part of the run's samples: part ``rank`` of
  ``world_size`` of the run's sample indices (:func:`bench.sampling.store.shard_range`), for
  the baseline and the cached setting, into the shared image store. A sample depends
  only on (seed, index), so the images are those of one process.
* **Sync.** Then every rank reports its outcome to every other
  (``all_gather_object``): a barrier that carries failures. A rank that fails before
  it still joins it with its error, so no rank waits for one that is gone, every rank
  raises, and rank 0 writes the failure record naming the rank.
* **Measuring.** After the sync, rank 0 alone computes the quality metrics over all
  samples and the cost (timing on an otherwise idle device), and writes ``run.json``
  once. In ``run.mode=cost`` the ranks sync first and rank 0 alone does the work.
  Every run syncs exactly once, so the jobs of a sweep stay in step.
* **Devices.** ``run.device=cuda`` becomes ``cuda:<LOCAL_RANK>`` on each rank, with the
  ``nccl`` backend; on the CPU the backend is ``gloo``. The process group is made once
  per process and reused by the jobs of a sweep.

Ranks wait at the sync for each other's generation, which differs when a resumed
store left some parts done: the timeout is long (:data:`SYNC_TIMEOUT`). A rank that
dies outright (killed, out of memory) ends the run through the launcher, which stops
the other ranks.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from bench.core.errors import HarnessError, one_line

# generation of the slowest part of a resumed run can take this long after the fastest
SYNC_TIMEOUT = timedelta(days=7)
# rank 0's launch time: how long ranks > 0 wait for it before Hydra starts
LAUNCH_TIMEOUT = timedelta(minutes=30)
_LAUNCH_KEY = "deepcache_bench/launch_time"


def env_rank() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the launcher's environment; ``(0, 1, 0)`` without one."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise HarnessError(
            f"RANK={os.environ.get('RANK')!r}, WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}, "
            f"LOCAL_RANK={os.environ.get('LOCAL_RANK')!r} must be integers (set by torchrun)"
        ) from None
    return rank, world, local


def launched() -> bool:
    """Whether a launcher started this process as one of several (``WORLD_SIZE`` > 1)."""
    return env_rank()[1] > 1


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that writes records and tables."""
    return env_rank()[0] == 0


@dataclass
class Context:
    """This process's place in a run: rank, world size, and the sync between ranks."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: no process group (one process)
    synced: bool = False  # whether this run's sync has happened (reset by begin())
    device: str = "cpu"  # this rank's device: run.device, with cuda -> cuda:<LOCAL_RANK> under a launcher

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def begin(self, device: str) -> "Context":
        """This context for a new run on ``device``: not yet synced."""
        self.synced, self.device = False, device
        return self

    def part(self, indices: range) -> range:
        """This rank's sample indices of a run that covers ``indices``."""
        if not self.distributed:
            return indices
        if len(indices) < self.world_size:
            raise HarnessError(
                f"{len(indices)} samples cannot be split over {self.world_size} processes: "
                f"raise run.num_samples or start fewer processes"
            )
        from bench.sampling.store import shard_range

        sub = shard_range(len(indices), self.world_size, self.rank)
        return range(indices.start + sub.start, indices.start + sub.stop)

    def sync(self, payload: Any) -> list[Any]:
        """Barrier: every rank's ``payload``, in rank order. Raises :class:`HarnessError`
        on every rank when any rank joined with :meth:`fail` instead."""
        return self._exchange(("ok", payload))

    def fail(self, error: BaseException) -> None:
        """Join this run's sync with ``error`` if this rank has not reached it yet, so the
        other ranks stop waiting and fail too. Never raises."""
        if self.backend is None or self.synced:
            return
        try:
            self._exchange(("failed", _failure(error)))
        except Exception:
            pass

    def _exchange(self, outcome: tuple[str, Any]) -> list[Any]:
        if not self.distributed:
            self.synced = True
            return [outcome[1]]
        import torch.distributed as dist

        outcomes: list[Any] = [None] * self.world_size
        dist.all_gather_object(outcomes, outcome)
        self.synced = True
        failed = [(r, msg) for r, (status, msg) in enumerate(outcomes) if status != "ok"]
        if failed:
            others = [(r, msg) for r, msg in failed if r != self.rank]
            if len(others) < len(failed):  # this rank failed: its own error is raised by its caller
                return [msg for _, msg in outcomes]
            r, msg = others[0]
            raise HarnessError(f"rank {r} of {self.world_size}: {msg}")
        return [payload for _, payload in outcomes]

    def record(self, parts: list[range]) -> dict[str, Any]:
        """What a run record says about the processes that generated it."""
        return {
            "world_size": self.world_size,
            "backend": self.backend,
            "sample_indices_by_rank": [[p.start, p.stop] for p in parts],
        }


_CONTEXT: Context | None = None


def current() -> Context:
    """The context :func:`setup` made, or this process's place from the environment."""
    if _CONTEXT is not None:
        return _CONTEXT
    rank, world, local = env_rank()
    return Context(rank=rank if world > 1 else 0, world_size=world, local_rank=local)


def setup(run_device: str) -> Context:
    """Join the run's process group (once per process) and put this rank on its device.

    The context's ``device`` is ``run_device``, except that ``cuda`` becomes
    ``cuda:<LOCAL_RANK>`` under a launcher; a device with an index is refused when several
    processes run, since they would share one GPU. The caller's settings are not changed."""
    global _CONTEXT
    rank, world, local = env_rank()
    if world <= 1:
        _CONTEXT = Context()
        return _CONTEXT.begin(str(run_device))
    import torch

    device = torch.device(str(run_device))
    mine = str(run_device)
    if device.type == "cuda":
        if device.index is not None:
            raise HarnessError(
                f"run.device={run_device!r} names one GPU, but {world} processes were started: "
                "use run.device=cuda (each process takes cuda:<LOCAL_RANK>)"
            )
        if local >= torch.cuda.device_count():
            raise HarnessError(
                f"LOCAL_RANK={local} but only {torch.cuda.device_count()} CUDA devices are visible: "
                "start at most one process per GPU (--nproc-per-node)"
            )
        mine = f"cuda:{local}"
        torch.cuda.set_device(local)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if _CONTEXT is None or _CONTEXT.backend is None:
        _init_process_group(backend, rank, world, local)
        _CONTEXT = Context(rank=rank, world_size=world, local_rank=local, backend=backend)
    elif _CONTEXT.backend != backend:
        raise HarnessError(
            f"run.device={run_device!r} needs the {backend} backend, but this process group uses "
            f"{_CONTEXT.backend}: one device type per torchrun command"
        )
    return _CONTEXT.begin(mine)


def _init_process_group(backend: str, rank: int, world: int, local: int) -> None:
    import torch
    import torch.distributed as dist

    store = dist.PrefixStore("default_pg", _store())
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        kwargs["device_id"] = torch.device("cuda", local)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=SYNC_TIMEOUT, **kwargs)
    atexit.register(_destroy)


def _destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


_STORE: Any = None


def _store() -> Any:
    """The launcher's key-value store (``env://`` rendezvous), opened once per process:
    rank 0 may host it, so it cannot be opened twice."""
    global _STORE
    if _STORE is None:
        import torch.distributed as dist

        rank, world, _ = env_rank()
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise HarnessError(f"WORLD_SIZE={world} but {var} is not set: start the processes with torchrun")
        store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world, timeout=LAUNCH_TIMEOUT))
        _STORE = store
    return _STORE


# ------------------------------------------------------------------------------------- launch time

_LAUNCH_TIME: datetime | None = None


def launch_time() -> datetime:
    """The time this command started: rank 0's under a launcher (after :func:`prepare_launch`),
    else taken once per process, so that a date and a time formatted from it always agree."""
    global _LAUNCH_TIME
    if _LAUNCH_TIME is None:
        _LAUNCH_TIME = datetime.now()
    return _LAUNCH_TIME


def prepare_launch(argv: list[str]) -> list[str]:
    """Before Hydra starts: agree on rank 0's launch time and return the Hydra overrides
    a rank > 0 adds to its command line (none for rank 0 or a single process)."""
    global _LAUNCH_TIME
    if not launched():
        return []
    rank, _, _ = env_rank()
    store = _store()
    if rank == 0:
        store.set(_LAUNCH_KEY, launch_time().isoformat())
    _LAUNCH_TIME = datetime.fromisoformat(store.get(_LAUNCH_KEY).decode())
    if rank == 0:
        return []
    extra = []
    if not any(a.startswith(("hydra.output_subdir=", "++hydra.output_subdir=")) for a in argv):
        extra.append("hydra.output_subdir=null")  # no .hydra/ of this rank in the shared directory
    if not any(a.startswith("hydra/job_logging=") for a in argv):
        extra.append("hydra/job_logging=stdout")  # no log file of this rank there either
    return extra


def _failure(e: BaseException) -> str:
    """What the other ranks are told of this rank's error: the harness's own messages as they
    are, anything else with its type."""
    return one_line(e, typed=not isinstance(e, HarnessError))
