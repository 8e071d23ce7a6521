"""Start N local processes with the torchrun environment contract, or join torchrun's.

:func:`run_local` forks ``nproc`` workers (the ``fork`` start method costs ~0.1 s a process
against 2-12 s for ``spawn``), gives each RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR and MASTER_PORT exactly as torchrun would, joins the process group, runs the
function and sends its return value back over a pipe. If any worker fails or dies, the others
are stopped within seconds and no process is left behind (workers also die with the parent).

Under ``torchrun`` (:func:`under_torchrun`), the same function runs in the current process.

Threads: each local process gets its share of the cores (``threads_per_process``); a set
``OMP_NUM_THREADS`` (torchrun sets one) wins. Verify, bench and tests pass ``threads=1`` where they
compare, so that every side runs alike.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing as mp
import os
import pickle
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import wait

from . import comm
from .errors import PlaitError

log = logging.getLogger(__name__)


class WorkerFailed(RuntimeError):
    """A worker process crashed, was killed, or the run timed out."""


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def local_slots() -> int:
    """Local processes a run defaults to: one per visible GPU, else one per usable CPU core."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else usable_cores()


def threads_per_process(nproc: int) -> int:
    """Intra-op threads for each of ``nproc`` local processes: ``OMP_NUM_THREADS`` where it is
    set, else this machine's usable cores divided among them (at least 1)."""
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    return max(1, usable_cores() // max(1, nproc))


def run_in_process(fn: Callable, args: tuple, collective_timeout_s: float = 600.0):
    """Join the torchrun-provided process group, run ``fn(*args)``, leave the group. Threads:
    torchrun's ``OMP_NUM_THREADS``, or the cores shared among the node's processes."""
    import torch

    torch.set_num_threads(threads_per_process(int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    comm.init_distributed(comm.pick_device(), collective_timeout_s)
    try:
        return fn(*args)
    finally:
        comm.shutdown()


def run_local(
    fn: Callable,
    nproc: int,
    args: tuple = (),
    *,
    timeout_s: float | None = None,
    collective_timeout_s: float = 600.0,
    threads: int = 1,
    tolerate: frozenset[int] = frozenset(),
) -> list:
    """Run ``fn(*args)`` on ``nproc`` forked ranks with ``threads`` intra-op threads each; return
    the per-rank results in rank order.

    Raises :class:`PlaitError` if a worker raised one (a user error), :class:`WorkerFailed` if a
    worker crashed or died or ``timeout_s`` passed; in both cases every worker is stopped first.
    A rank in ``tolerate`` that dies is only reported (an asynchronous parameter server's worker:
    the others go on without it); its result is None, and the key ``plait/lost/<rank>`` is set in
    the run's TCPStore for the ranks that must know.
    """
    ctx = mp.get_context("fork")
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(nproc)}
    procs, readers = [], []
    for rank in range(nproc):
        reader, writer = ctx.Pipe(duplex=False)
        p = ctx.Process(
            target=_worker, args=(rank, env, fn, args, writer, threads, collective_timeout_s),
            name=f"plait-rank{rank}",
        )
        p.start()
        writer.close()
        procs.append(p)
        readers.append(reader)
    try:
        return _supervise(procs, readers, timeout_s, tolerate, env)
    finally:
        _stop_all(procs)


def _supervise(procs: list, readers: list, timeout_s: float | None, tolerate: frozenset[int] = frozenset(),
               env: dict | None = None) -> list:
    results: dict[int, tuple] = {}
    exited: set[int] = set()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    pending = dict(enumerate(readers))
    while len(exited) < len(procs):
        watch = list(pending.values()) + [p.sentinel for i, p in enumerate(procs) if i not in exited]
        for obj in wait(watch, timeout=0.5):
            rank = _rank_of(obj, pending, procs)
            if obj in pending.values():
                with contextlib.suppress(EOFError):
                    results[rank] = _recv(obj)
                del pending[rank]
                _raise_if_failed(rank, results.get(rank))
            else:
                procs[rank].join(5)
                exited.add(rank)
                if procs[rank].exitcode != 0 and rank in tolerate and rank not in results:
                    _lost(rank, procs[rank].exitcode, env)
                    results[rank] = ("ok", None)
                    pending.pop(rank, None)
                elif procs[rank].exitcode != 0:
                    _drain(pending, results)
                    _raise_failure(rank, procs[rank].exitcode, results)
        if deadline is not None and time.monotonic() > deadline:
            raise WorkerFailed(f"workers did not finish within {timeout_s:.0f} s; all were stopped")
    _drain(pending, results)
    missing = [r for r in range(len(procs)) if r not in results]
    if missing:
        raise WorkerFailed(f"rank {missing[0]} exited without a result")
    return [results[r][1] for r in range(len(procs))]


def _lost(rank: int, exitcode: int, env: dict) -> None:
    """Report a tolerated rank's death, and tell the others through the run's TCPStore."""
    from datetime import timedelta

    from torch.distributed import TCPStore

    how = f"was killed by signal {-exitcode}" if exitcode < 0 else f"exited with code {exitcode}"
    print(f"plait: rank {rank} {how}; the run goes on without it", file=sys.stderr, flush=True)
    with contextlib.suppress(Exception):  # the store lives in rank 0: gone with it, and then so is the run
        store = TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=10), wait_for_workers=False)
        store.set(f"plait/lost/{rank}", "1")


def _send(conn, msg: tuple) -> None:
    """Plain pickle: torch's multiprocessing reductions would pass tensors through shared memory
    handles that die with the worker."""
    conn.send_bytes(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))


def _recv(conn) -> tuple:
    return pickle.loads(conn.recv_bytes())


def _rank_of(obj, pending: dict, procs: list) -> int:
    for rank, reader in pending.items():
        if reader is obj:
            return rank
    return next(i for i, p in enumerate(procs) if p.sentinel == obj)


def _drain(pending: dict, results: dict) -> None:
    """Read whatever exited workers left in their pipes."""
    for rank, reader in list(pending.items()):
        if reader.poll(0):
            with contextlib.suppress(EOFError):
                results[rank] = _recv(reader)
            del pending[rank]


def _raise_if_failed(rank: int, msg: tuple | None) -> None:
    if msg is not None and msg[0] == "error":
        raise PlaitError(msg[1])
    if msg is not None and msg[0] == "crash":
        raise WorkerFailed(f"rank {rank} failed: {msg[1]}")


def _raise_failure(rank: int, exitcode: int, results: dict) -> None:
    for r, msg in results.items():
        _raise_if_failed(r, msg)
    how = f"was killed by signal {-exitcode}" if exitcode < 0 else f"exited with code {exitcode}"
    raise WorkerFailed(f"rank {rank} {how}; all ranks were stopped")


def _stop_all(procs: list, grace_s: float = 3.0) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    end = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()


def _die_with_parent() -> None:
    """Linux: deliver SIGKILL to this worker when the launching process dies."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _worker(rank, env, fn, args, conn, threads, collective_timeout_s) -> None:
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=env["WORLD_SIZE"])
    _die_with_parent()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    import torch

    torch.set_num_threads(threads)
    code = 0
    try:
        comm.init_distributed(comm.pick_device(), collective_timeout_s)
        _send(conn, ("ok", fn(*args)))
    except PlaitError as e:
        code = 2
        _send(conn, ("error", str(e)))
    except BaseException as e:  # noqa: BLE001 - report every crash to the parent, then exit
        code = 1
        log.error("rank %d crashed:\n%s", rank, traceback.format_exc().rstrip())
        with contextlib.suppress(Exception):
            _send(conn, ("crash", f"{type(e).__name__}: {e}"))
    finally:
        if code == 0:  # after a failure peers may be gone: skip the collective teardown
            comm.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
