"""How data-loader workers start and what they do with SLURM's preemption signals.

Light on purpose (no Lightning): the workers import it when they unpickle their ``worker_init_fn``, and the
fork server imports it when it starts (:mod:`ldm.data.forkserver_preload`).
"""

from __future__ import annotations

import io
import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver
import os
import pickle
import signal
import types
from collections.abc import Callable
from typing import Any

#: the signals SLURM sends every process of a job step before ending it; only the training process acts on them
PREEMPTION_SIGNALS = frozenset({signal.SIGUSR1, signal.SIGTERM})


def ignore_preemption_signal(worker_id: int) -> None:
    """``worker_init_fn`` of every loader: a DataLoader worker ignores SIGUSR1 and SIGTERM.

    SLURM signals every process of a job step. With USR1, forked workers would run the handler they
    inherit (Lightning's saved a stale ``hpc_ckpt`` of the weights the worker was forked with and
    requeued the job, racing the training process); with SIGTERM they would die at once, and the
    training process would fail on its next batch before it could checkpoint the step it is at. The
    training process alone handles both (:class:`ldm.callbacks.preemption.Preemption`); a worker ends
    when the loader shuts it down or, failing that, when its parent is gone (PyTorch's watchdog).
    :class:`~ldm.data.datamodule.PreemptionSafeLoader` starts its workers with the signals blocked, so one
    that arrives before this function runs stays pending and is dropped here.
    """
    for signum in PREEMPTION_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, PREEMPTION_SIGNALS)


def worker_context() -> multiprocessing.context.BaseContext:
    """How loader workers start: forked from a fork server (``forkserver``), not from the training process.

    A training process has threads (the loaders' queue feeders, the process group's, W&B's), and CPython 3.11
    can fork it while one of them holds the interpreter's thread-list lock: the forked worker then waits for
    that lock forever inside ``os.fork`` (``_PyThreadState_DeleteExcept``), its loader never yields a batch,
    and under DDP the other ranks wait in their next collective (make test-slurm's two-rank jobs hung at
    their first validation in 2 of 3 runs). The fork server is a clean single-threaded process, started once
    per training process with torch and the data modules imported (:mod:`ldm.data.forkserver_preload`,
    which also makes it ignore the preemption signals, and the modules the first loader's dataset is made of:
    :func:`start_forkserver`), so a worker starts in about 0.16 s (0.07 s forked).
    ``LDM_WORKER_START=fork`` (or ``spawn``) chooses another start method."""
    method = os.environ.get("LDM_WORKER_START", "forkserver")
    if method not in ("forkserver", "fork", "spawn"):
        raise ValueError(f"LDM_WORKER_START={method!r}: use forkserver (the default), fork or spawn")
    return multiprocessing.get_context(method)


#: whether this process has started its fork server (after that, its preload list has no effect)
_STARTED = False


def start_forkserver(*objects: Any) -> None:
    """Start the fork server, once per process, importing what a worker needs to unpickle ``objects`` (the
    first loader's dataset, ``worker_init_fn``, ``collate_fn``): torch, the streams, a tokenizer's library.

    A worker unpickles its dataset in a fresh process; every module the pickle names that the fork server
    did not import, the worker imports itself, at every epoch (open_clip or Lightning: seconds each).
    Modules that cannot be imported are skipped by the fork server. Call it with the preemption signals
    blocked (the server inherits the mask until its preload makes it ignore them)."""
    global _STARTED
    if _STARTED:
        return
    recorder = _ModuleRecorder(io.BytesIO())
    try:
        recorder.dump(objects)
    except Exception:  # noqa: BLE001  (unpicklable: starting the worker reports the real error)
        return
    modules = sorted(m for m in recorder.modules if m and m not in ("__main__", "builtins"))
    multiprocessing.set_forkserver_preload(["ldm.data.forkserver_preload", *modules])
    multiprocessing.forkserver.ensure_running()
    _STARTED = True


class _ModuleRecorder(pickle.Pickler):
    """A pickler that records the module of every class, function and object it pickles."""

    def __init__(self, file: io.BytesIO):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.modules: set[str] = set()

    def reducer_override(self, obj: Any) -> Any:
        named = isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType))
        module = getattr(obj, "__module__", None) if named else type(obj).__module__
        if isinstance(module, str):
            self.modules.add(module)
            if not named and module.startswith("multiprocessing."):
                return int, ()  # shared counters and locks pickle only while a process starts: not needed here
        return NotImplemented


class ChainedInit:
    """``worker_init_fn``: ignore the preemption signal, then run the user's function (picklable)."""

    def __init__(self, fn: Callable[[int], Any]):
        self.fn = fn

    def __call__(self, worker_id: int) -> None:
        ignore_preemption_signal(worker_id)
        self.fn(worker_id)
