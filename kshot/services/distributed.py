"""Meta-training on several processes and machines with ``torch.distributed`` (``torchrun``).

Launch (one machine, N processes; see docs/DISTRIBUTED.md for several machines)::

    torchrun --standalone --nproc-per-node N -m kshot train --preset quick --meta-batch-size 8

How the work is shared. An outer step meta-trains on a meta-batch of B tasks. Rank r of N
computes tasks ``(step, i)`` for i in ``[r*B/N, (r+1)*B/N)``; since task ``(step, i)`` is a pure
function of ``(seed, step, i)``, the ranks together compute exactly the meta-batch one process
would draw, each from the run seed and its own slice of indices. Each rank's
``learner.meta_gradient`` leaves in ``.grad`` the mean over its B/N tasks; the mean of those over
ranks (one all-reduce) is the mean over all B tasks, so every rank takes the same outer step
from the same weights: N processes train the model one process would.

Why not ``DistributedDataParallel``: DDP averages gradients from hooks on ``backward()`` of one
forward pass of one wrapped module. Meta-learners compute their meta-gradient in their own way
(a loop of tasks, ``torch.func`` transforms that set ``.grad`` directly, second-order terms), so
the trainer averages ``.grad`` itself after ``meta_gradient`` returns: one flat buffer, one
all-reduce per step, and any learner that honours the ``meta_gradient`` contract distributes.

The same all-reduce averages the step's metrics and merges the batch-norm running statistics
that each rank updated on its own tasks into exactly what one process would have computed
(:class:`RunningStatistics`), so after every step every rank holds the single process's state,
and validation, checkpoints and logs are those of a one-process run.

Side effects (files, logs, progress bars) happen on rank 0 only; rank 0 also reads checkpoints
and hands their contents to the other ranks, so only rank 0 needs to see the run directory.
"""

from __future__ import annotations

import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterable, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm

from kshot.errors import ConfigError, DistributedError, KshotError

#: Seconds a process waits for the others in a collective before it gives up (torch's own NCCL
#: default): long enough for a rank that builds a dataset cache, short enough not to hang forever.
DEFAULT_TIMEOUT = 600.0

T = TypeVar("T")


@dataclass
class Distributed:
    """This process's place in a (possibly one-process) run, and the collectives the trainer uses.

    Args:
        rank: this process's index, 0..world_size-1; rank 0 does the side effects.
        world_size: number of processes sharing each meta-batch.
        local_rank: index among the processes of this machine (selects its GPU).
        device: where this rank computes (``cuda:<local_rank>`` on GPUs); None: the config's.
        timeout: seconds a collective waits for the other ranks before failing.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None
    timeout: float = DEFAULT_TIMEOUT

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """True when there are other processes to talk to."""
        return self.world_size > 1

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.world_size}"

    # ------------------------------------------------------------------ the meta-batch
    def task_indices(self, meta_batch_size: int) -> list[int]:
        """Indices of this rank's share of the tasks of each meta-batch (a contiguous slice)."""
        check_divisible(meta_batch_size, self.world_size)
        per_rank = meta_batch_size // self.world_size
        return list(range(self.rank * per_rank, (self.rank + 1) * per_rank))

    def snapshot_statistics(self, module: torch.nn.Module) -> "RunningStatistics | None":
        """Batch-norm running statistics before a step, for :meth:`average_gradients` to merge."""
        return RunningStatistics(module) if self.enabled else None

    def average_gradients(self, params: Iterable[torch.nn.Parameter],
                          metrics: dict[str, float] | None = None,
                          statistics: "RunningStatistics | None" = None) -> dict[str, float]:
        """Make ``.grad`` of ``params`` and ``metrics`` the mean over ranks, and merge the
        running statistics each rank updated since ``statistics`` was taken; one all-reduce
        (per dtype) for all of it. Returns the averaged metrics.

        A parameter without a gradient on some ranks counts as a zero gradient there; one
        without a gradient on every rank keeps ``grad = None`` (so optimisers skip it, as they
        would in one process). Every rank must report the same metric names.
        """
        metrics = dict(metrics or {})
        if not self.enabled:
            return metrics
        params = list(params)
        names = sorted(metrics)
        reference = params[0] if params else None
        device = reference.device if reference is not None else self._comm_device
        # Which ranks have a gradient for each parameter, and the metrics, ride along in the
        # same buffer: one message per step however many parameters there are.
        status = torch.tensor([float(p.grad is not None) for p in params] + [float(metrics[k]) for k in names],
                              dtype=torch.float32, device=device)
        grads = []
        for p in params:
            if p.grad is not None and p.grad.is_sparse:
                raise ConfigError("sparse gradients cannot be averaged across processes; "
                                  "use dense parameters")
            grads.append(p.grad if p.grad is not None else torch.zeros_like(p))
        summed = statistics.contributions(self) if statistics is not None else []
        self._all_reduce([*grads, status], summed, "averaging the meta-gradient")
        present = status[:len(params)].tolist()
        for p, g, flag in zip(params, grads, present):
            if flag > 0 and p.grad is None:
                p.grad = g
        if statistics is not None:
            statistics.merge(summed)
        return {k: v for k, v in zip(names, status[len(params):].tolist())}

    # ------------------------------------------------------------------ state and rank 0
    def broadcast_state(self, module: torch.nn.Module) -> None:
        """Give every rank rank 0's parameters and buffers (identical starting points)."""
        if not self.enabled:
            return
        tensors = [t.data for t in (*module.parameters(), *module.buffers())]
        with torch.no_grad():
            for group in _by_dtype_and_device(list(range(len(tensors))), tensors):
                members = [tensors[i] for i in group]
                flat = torch.cat([t.reshape(-1) for t in members])
                self._collective("receiving rank 0's weights", lambda: dist.broadcast(flat, src=0))
                _unflatten_into(flat, members)

    def from_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 and return its result on every rank (or raise its error there).

        Rank 0 reads files (checkpoints) and the others receive what it read, so the run
        directory need only be visible to rank 0, and every rank resumes from identical state.
        """
        if not self.enabled:
            return fn()
        payload: list[Any] = [None]
        failure: BaseException | None = None
        if self.is_main:
            try:
                payload[0] = (True, fn())
            except KshotError as e:
                payload[0] = (False, e)
            except Exception as e:  # tell the others before failing here
                failure = e
                payload[0] = (False, DistributedError(f"rank 0 failed: {type(e).__name__}: {_first_line(e)}"))
        kwargs = {"device": self._comm_device} if self._comm_device.type == "cuda" else {}
        self._collective("receiving rank 0's state",
                         lambda: dist.broadcast_object_list(payload, src=0, **kwargs))
        if failure is not None:
            raise failure
        ok, value = payload[0]
        if not ok:
            raise value
        return value

    def share(self, n: int) -> tuple[int, int]:
        """This rank's contiguous share ``[lo, hi)`` of ``n`` items (tasks to evaluate): ranks in
        order, equal shares of ``ceil(n / world_size)``, only the last ones short."""
        per_rank = -(-n // self.world_size)
        lo = min(self.rank * per_rank, n)
        return lo, min(lo + per_rank, n)

    def gather_shares(self, rows: torch.Tensor, n: int) -> torch.Tensor:
        """Every rank's :meth:`share` of ``n`` rows ``[hi - lo, k]``, concatenated in order on
        every rank: ``[n, k]``, as one process would have computed them."""
        if not self.enabled:
            return rows
        per_rank = -(-n // self.world_size)
        local = torch.full((per_rank, *rows.shape[1:]), float("nan"), dtype=rows.dtype,
                           device=self._comm_device)
        local[:len(rows)] = rows.to(self._comm_device)
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        self._collective("gathering results", lambda: dist.all_gather(parts, local))
        return torch.cat(parts)[:n].cpu()

    def barrier(self) -> None:
        """Wait for every rank."""
        if not self.enabled:
            return
        kwargs = {"device_ids": [self._comm_device.index]} if self._comm_device.type == "cuda" else {}
        self._collective("waiting for the other processes", lambda: dist.barrier(**kwargs))

    # ------------------------------------------------------------------ plumbing
    @property
    def _comm_device(self) -> torch.device:
        """Where collective tensors live: the GPU for NCCL, else the CPU."""
        if self.device is not None and self.device.type == "cuda":
            return self.device
        return torch.device("cpu")

    def _all_reduce(self, means: list[torch.Tensor], sums: list[torch.Tensor], what: str) -> None:
        """All-reduce in place: ``means`` become the mean over ranks, ``sums`` the sum."""
        tensors = [*means, *sums]
        is_mean = [True] * len(means) + [False] * len(sums)
        with torch.no_grad():
            for group in _by_dtype_and_device(list(range(len(tensors))), tensors):
                members = [tensors[i] for i in group]
                flat = torch.cat([t.reshape(-1) for t in members])
                self._collective(what, lambda: dist.all_reduce(flat, op=dist.ReduceOp.SUM))
                _unflatten_into(flat, members)
                for i in group:
                    if is_mean[i]:
                        tensors[i].div_(self.world_size)

    def _collective(self, what: str, fn: Callable[[], T]) -> T:
        """Run one collective; a dead, failed or stuck peer becomes a one-line DistributedError."""
        try:
            return fn()
        except KshotError:
            raise
        except Exception as e:  # DistBackendError, DistNetworkError, RuntimeError from gloo
            raise DistributedError(
                f"{self}: {what} failed: another process stopped, failed or took longer than the "
                f"{self.timeout:g} s timeout (its own error, if any, is above; raise --dist-timeout "
                f"if a step can legitimately take longer) [{_first_line(e)}]") from None


class RunningStatistics:
    """Batch-norm running statistics as they were before a step, to merge the ranks' updates.

    One process updates a batch-norm layer's running mean and variance once per forward pass,
    task after task: ``r <- (1 - m) r + m x``. Rank k of N runs the k-th contiguous part of that
    sequence of updates, starting from the same ``r0``. The updates are linear, so the ranks'
    results combine into exactly the single process's: with ``u`` updates per rank,
    ``r = (1 - m)^(N u) r0 + sum_k (1 - m)^(u (N - 1 - k)) (r_k - (1 - m)^u r0)``; with
    ``momentum=None`` (a cumulative average) the counts weight the ranks' sums. Other
    floating-point buffers are averaged.
    """

    def __init__(self, module: torch.nn.Module):
        norms = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats
                 and m.running_mean is not None and m.num_batches_tracked is not None]
        tracked = {id(t) for m in norms for t in (m.running_mean, m.running_var, m.num_batches_tracked)}
        self.norms = norms
        self.before = [(m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked))
                       for m in norms]
        self.others = [b for b in module.buffers() if b.is_floating_point() and id(b) not in tracked]
        self._updates: list[int] = []

    def contributions(self, d: Distributed) -> list[torch.Tensor]:
        """What this rank adds to the sums: per layer its weighted mean and variance updates and
        its update count; the other buffers divided by N (so that their sum is their mean)."""
        out: list[torch.Tensor] = []
        self._updates = []
        for m, (mean0, var0, n0) in zip(self.norms, self.before):
            n = int(m.num_batches_tracked)
            u = n - n0
            self._updates.append(u)
            if m.momentum is None:  # cumulative average: n * r is a sum over batches
                parts = [n * m.running_mean - n0 * mean0, n * m.running_var - n0 * var0]
            else:
                keep = 1.0 - m.momentum
                later = keep ** (u * (d.world_size - 1 - d.rank))
                parts = [later * (m.running_mean - keep ** u * mean0),
                         later * (m.running_var - keep ** u * var0)]
            out += [p.detach().to(m.running_mean.dtype) for p in parts]
            out.append(torch.tensor([float(u)], dtype=m.running_mean.dtype, device=m.running_mean.device))
        out += [b.detach() / d.world_size for b in self.others]
        return out

    @torch.no_grad()
    def merge(self, sums: list[torch.Tensor]) -> None:
        """Set the statistics from the all-reduced :meth:`contributions`."""
        for i, (m, (mean0, var0, n0)) in enumerate(zip(self.norms, self.before)):
            d_mean, d_var, total = sums[3 * i:3 * i + 3]
            updates = int(round(float(total)))
            if m.momentum is None:
                n = max(n0 + updates, 1)
                m.running_mean.copy_((n0 * mean0 + d_mean) / n)
                m.running_var.copy_((n0 * var0 + d_var) / n)
            else:
                decay = (1.0 - m.momentum) ** updates
                m.running_mean.copy_(decay * mean0 + d_mean)
                m.running_var.copy_(decay * var0 + d_var)
            m.num_batches_tracked.fill_(n0 + updates)
        for b, total in zip(self.others, sums[3 * len(self.norms):]):
            b.copy_(total)


def _by_dtype_and_device(keys: list[int], tensors: list[torch.Tensor]) -> list[list[int]]:
    """``keys`` grouped so that each group's tensors can share one flat buffer."""
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for k, t in zip(keys, tensors):
        groups.setdefault((t.dtype, t.device), []).append(k)
    return list(groups.values())


def _unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


def _first_line(e: BaseException, limit: int = 160) -> str:
    """The gist of a backend's message: first line, without its source location, shortened."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = re.sub(r"^\[[^\]]*\]\s*", "", lines[0]) if lines else type(e).__name__
    return text if len(text) <= limit else text[:limit - 3].rstrip() + "..."


# ----------------------------------------------------------------------------- set-up
def check_divisible(meta_batch_size: int, world_size: int) -> None:
    """Equal shares are what makes the mean of rank means the meta-batch's mean."""
    if meta_batch_size % world_size:
        raise ConfigError(f"meta_batch_size {meta_batch_size} does not divide across {world_size} "
                          f"processes; use a multiple of {world_size} (e.g. --meta-batch-size "
                          f"{world_size * max(1, round(meta_batch_size / world_size))}) or start "
                          f"fewer processes")


def single_process() -> Distributed:
    return Distributed()


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} must be an integer "
                          f"(torchrun sets it; unset it to run a single process)") from None


def env_world() -> tuple[int, int, int, int] | None:
    """(rank, world_size, local_rank, local_world_size) that torchrun put in the environment,
    or None when this process was started alone."""
    world_size = _env_int("WORLD_SIZE")
    if world_size is None:
        return None
    rank = _env_int("RANK")
    if rank is None:
        raise ConfigError("WORLD_SIZE is set but RANK is not; start distributed runs with torchrun")
    local_rank = _env_int("LOCAL_RANK")
    local_world = _env_int("LOCAL_WORLD_SIZE")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"RANK={rank} is not within WORLD_SIZE={world_size}")
    return rank, world_size, rank if local_rank is None else local_rank, \
        (world_size if local_world is None else local_world)


def rank_label() -> str:
    """``"[rank r/N] "`` in a distributed run's processes, else ``""`` (for error lines)."""
    try:
        world = env_world()
    except ConfigError:
        return ""
    return f"[rank {world[0]}/{world[1]}] " if world and world[1] > 1 else ""


def process_device(device: str, local_rank: int, local_world_size: int) -> torch.device:
    """The device of this process: GPU ``local_rank`` when the config asks for CUDA."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        d = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}; use cpu, cuda or auto") from None
    if d.type == "cpu":
        return d
    if d.type != "cuda":
        raise ConfigError(f"distributed runs use cpu (gloo) or cuda (nccl) devices, not {device!r}")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but torch sees no CUDA device; use --device cpu")
    if d.index is not None:
        if local_world_size > 1:
            raise ConfigError(f"--device {device} would put all {local_world_size} processes of this "
                              f"machine on one GPU; use --device cuda (each process takes GPU LOCAL_RANK)")
        d = torch.device("cuda", d.index)
    else:
        n = torch.cuda.device_count()
        if local_rank >= n:
            raise ConfigError(f"process {local_rank} of this machine has no GPU of its own ({n} visible); "
                              f"start at most {n} processes per machine (--nproc-per-node {n})")
        d = torch.device("cuda", local_rank)
    torch.cuda.set_device(d)
    return d


def current(timeout: float = DEFAULT_TIMEOUT) -> Distributed:
    """The run this process belongs to: a process group initialised already (by the caller or
    :func:`launch`), or a single process. Refuses a torchrun process with no group, which would
    otherwise train alone and write the same files as its siblings."""
    if dist.is_available() and dist.is_initialized():
        world = env_world()
        local_rank = world[2] if world else 0
        device = None
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        return Distributed(dist.get_rank(), dist.get_world_size(), local_rank, device, timeout)
    world = env_world()
    if world is not None and world[1] > 1:
        raise ConfigError(f"this process is one of {world[1]} that torchrun started, but no process "
                          f"group is set up; use kshot.train(), or pass dist= from "
                          f"kshot.services.distributed.launch()")
    return single_process()


_JOINED_A_GROUP = False  # set by launch(); read by joined_a_group()


@contextmanager
def launch(device: str = "cpu", timeout: float = DEFAULT_TIMEOUT,
           meta_batch_size: int | None = None) -> Iterator[Distributed]:
    """The run described by torchrun's environment, for the duration of the ``with`` block.

    Under torchrun (``WORLD_SIZE`` > 1) this joins the process group (NCCL when the run is on
    CUDA devices, gloo otherwise) with ``timeout`` seconds for every collective, pins the process
    to GPU ``LOCAL_RANK``, and leaves the group at the end. Started alone, it is a single process.

    Raises:
        ConfigError: ``meta_batch_size`` does not divide among the processes (raised before any
            process waits for another), or the environment or device are inconsistent.
        DistributedError: the processes could not meet within ``timeout`` seconds.
    """
    if dist.is_available() and dist.is_initialized():  # the caller manages the group
        d = current(timeout)
        if meta_batch_size is not None:
            check_divisible(meta_batch_size, d.world_size)
        yield d
        return
    world = env_world()
    if world is None or world[1] == 1:
        yield single_process()
        return
    rank, world_size, local_rank, local_world = world
    if meta_batch_size is not None:
        check_divisible(meta_batch_size, world_size)
    if timeout <= 0:
        raise ConfigError(f"dist_timeout must be positive, not {timeout}")
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world_size} but {' and '.join(missing)} not set; "
                          f"start distributed runs with torchrun")
    if not dist.is_available():
        raise ConfigError("this build of torch has no torch.distributed; run a single process")
    the_device = process_device(device, local_rank, local_world)
    backend = "nccl" if the_device.type == "cuda" else "gloo"
    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout), rank=rank,
                                world_size=world_size)
    except Exception as e:
        raise DistributedError(f"rank {rank} of {world_size}: could not join the other processes at "
                               f"{where} ({backend}) within {timeout:g} s; check that all were "
                               f"started and can reach MASTER_ADDR [{_first_line(e)}]") from None
    global _JOINED_A_GROUP
    _JOINED_A_GROUP = True
    d = Distributed(rank, world_size, local_rank, the_device, timeout)
    try:
        yield d
        d.barrier()  # leave together: no rank tears its connections down under a busy peer
    finally:
        dist.destroy_process_group()


def joined_a_group() -> bool:
    """Whether :func:`launch` joined a process group in this process.

    torch's own teardown of a gloo process group at interpreter exit, after
    ``destroy_process_group``, now and then aborts the process (SIGABRT, "terminate called without
    an active exception": twice in about 95 two-process runs on a loaded 2-core machine), so
    that torchrun reports a finished run as failed. The command line ends such a process with
    :func:`end_process` instead.
    """
    return _JOINED_A_GROUP


def end_process(code: int) -> None:
    """End this process with ``code`` now: flush the standard streams, then skip the
    interpreter's and C++ libraries' exit-time teardown (every file kshot writes is complete and
    closed by then: writes are atomic)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing more can be said on it
            pass
    os._exit(code)
