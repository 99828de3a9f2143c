"""Where a sweep's runs execute: one at a time in this process, in a pool of local processes, or as
Ray tasks on a cluster. An engine runs the calls it is given and hands back each outcome as it
finishes; it knows nothing of sweeps (`st.sweep` decides what to run and in which order).

The sweep folder is the single source of truth: every call resumes from the progress its run folder
holds, so a call repeated elsewhere (Ray retrying a task whose worker or node died, a rerun after
the driver died) picks up where the dead attempt stopped. Workers never outlive their parent: a
pool worker dies with the process that started it, even one killed with -9, and an interrupted
sweep stops its running calls before it returns.
"""

from __future__ import annotations

import heapq
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Hashable, Protocol

from st import dist
from st.errors import UserError

log = logging.getLogger("st")

Outcome = tuple[Hashable, Any, "BaseException | None"]  # (key, the call's value, or the exception it raised)


class Engine(Protocol):
    slots: int  # calls that run at once

    def submit(self, key: Hashable, fn: Callable, *args) -> None: ...  # runs fn(*args, device=its slot's device)

    def next(self) -> Outcome: ...  # blocks until a submitted call ends

    def close(self) -> None: ...  # stops whatever still runs (an interrupt), frees the workers


class WorkerDied(RuntimeError):
    """The process running a call died (killed, out of memory): the call neither returned nor raised."""


# ---- in every worker process ---------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSetup:
    """What a worker process needs before its first call: torch threads and the user's task modules."""

    threads: int = 1
    user_modules: tuple[str, ...] = ()

    @classmethod
    def here(cls, threads: int) -> WorkerSetup:
        """Tasks registered by `st --user-dir` live in this process only: workers import their modules
        again (those that registered a task, so a module whose import failed is not retried there)."""
        from st.tasks import TASKS

        found = []
        for factory in TASKS.values():
            name = getattr(factory, "__module__", "").split(".")[0]
            path = getattr(sys.modules.get(name), "__file__", None)
            if name.startswith("st_user_") and path:
                path = str(Path(path).parent) if Path(path).name == "__init__.py" else path
                found += [] if path in found else [path]
        return cls(threads, tuple(found))

    def apply(self) -> None:
        import torch

        from st.tasks import import_user_dir

        torch.set_num_threads(self.threads)
        for path in self.user_modules:
            import_user_dir(path)  # a no-op when imported already (Ray reuses a worker for many calls)


_READY: WorkerSetup | None = None  # what this Ray worker process was set up with


def _call(setup: WorkerSetup, device: str, fn: Callable, *args):
    """A Ray task: set the worker up (once per process), then run the call (Ray shows a task only its
    own GPU, as cuda)."""
    global _READY
    if _READY != setup:
        setup.apply()
        _READY = setup
    return fn(*args, device=device)


# ---- one call at a time, here --------------------------------------------------------------------


class InProcess:
    """Calls run one at a time in this process (on every rank under torchrun), the smallest key first:
    the sweep's keys are (seed, position), so a sequential sweep goes seed by seed."""

    slots = 1

    def __init__(self, device: str):
        self.device, self.queue = device, []

    def submit(self, key, fn, *args):
        heapq.heappush(self.queue, (key, fn, args))

    def next(self) -> Outcome:
        key, fn, args = heapq.heappop(self.queue)
        try:
            return key, fn(*args, device=self.device), None
        except Exception as e:
            return key, None, e

    def close(self):
        self.queue.clear()


# ---- a pool of local processes -------------------------------------------------------------------


def _die_with(parent: int) -> None:
    """Stop when the parent dies, even by kill -9, when it can stop no one: an orphan would go on
    training into the sweep folder, holding its memory (and its GPU)."""
    armed = False
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1  # the kernel sends us SIGKILL when the process that started us exits
        armed = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL) == 0
    if not armed:  # elsewhere, a thread watches for the parent to go

        def watch():
            while os.getppid() == parent:
                time.sleep(1)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent:  # it died before we were armed
        os._exit(1)


def _serve(conn, parent: int, setup: WorkerSetup, device: str) -> None:
    """A pool worker on `device` (cpu, or the GPU it owns): run the calls the parent sends, one at a
    time, until it sends None or dies."""
    _die_with(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent stops us
    try:
        setup.apply()
        if device.startswith("cuda"):
            import torch

            torch.cuda.set_device(device)
        broken = None
    except Exception as e:  # e.g. a user's task module that fails here: every call says why, in one line
        broken = e
    while True:
        try:
            job = conn.recv()
        except EOFError:  # the parent is gone
            return
        if job is None:
            return
        fn, args = job
        try:
            if broken is not None:
                raise broken
            outcome = fn(*args, device=device), None
        except Exception as e:
            outcome = None, e
        try:
            conn.send(outcome)
        except Exception as e:  # an outcome that does not pickle: send what it said
            conn.send((None, RuntimeError(f"{outcome[1] or outcome[0]!r} (could not be sent back: {e})")))


class LocalPool:
    """`jobs` spawned processes on this machine, each running one call at a time; on CUDA each owns
    one GPU (cuda:0, cuda:1, ...). A worker that dies fails its call (a rerun resumes it) and is replaced."""

    def __init__(self, jobs: int, setup: WorkerSetup, device: str = "cpu"):
        import multiprocessing

        self.ctx = multiprocessing.get_context("spawn")  # a fork would copy this process's torch threads and CUDA state
        self.setup, self.slots = setup, jobs
        self.queue: deque = deque()
        self.busy: dict = {}  # worker -> key of its call
        self.idle = [self._start(f"cuda:{i}" if device == "cuda" else device) for i in range(jobs)]

    def _start(self, device: str):
        conn, child = self.ctx.Pipe()
        process = self.ctx.Process(target=_serve, args=(child, os.getpid(), self.setup, device), daemon=True)
        process.start()
        child.close()
        process.conn, process.device = conn, device
        return process

    def submit(self, key, fn, *args):
        self.queue.append((key, fn, args))

    def next(self) -> Outcome:
        from multiprocessing.connection import wait

        while self.idle and self.queue:
            worker, (key, fn, args) = self.idle.pop(), self.queue.popleft()
            worker.conn.send((fn, args))
            self.busy[worker] = key
        ready = wait([w.conn for w in self.busy] + [w.sentinel for w in self.busy])
        worker = next(w for w in self.busy if w.conn in ready or w.sentinel in ready)
        key = self.busy.pop(worker)
        if worker.conn.poll():
            try:
                value, error = worker.conn.recv()
                self.idle.append(worker)
                return key, value, error
            except (EOFError, OSError):  # it died while sending
                pass
        worker.join()
        worker.conn.close()
        self.idle.append(self._start(worker.device))
        how = f"killed by signal {-worker.exitcode}" if worker.exitcode < 0 else f"exit code {worker.exitcode}"
        return key, None, WorkerDied(f"its worker process died ({how}); rerun the same command to resume it")

    def close(self):
        """Idle workers finish; busy ones (an interrupt, or an error that stops the sweep) are stopped."""
        workers = [*self.idle, *self.busy]
        for w in self.idle:
            try:
                w.conn.send(None)
            except OSError:  # it died idle
                pass
        for w in self.busy:
            w.terminate()
        for w in workers:
            w.join(timeout=10)
            if w.is_alive():
                w.kill()
                w.join()
            w.conn.close()
        self.idle, self.busy = [], {}


# ---- Ray ---------------------------------------------------------------------------------------


# Joining, Ray tries 20 times, up to 30 s each, SIGTERM and Ctrl-C waiting: st 5 times, 5 s (unless set).
_JOIN_LIMITS = {"RAY_gcs_server_port_wait_time_s": "5", "RAY_py_gcs_connect_timeout_s": "5"}
# A Ray head's GCS (gRPC) answers an HTTP/2 preface and SETTINGS frame with its own SETTINGS frame (type 4).
_HTTP2_HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def _dial(address: str) -> None:
    """Fail in seconds, not Ray's minutes, where no Ray head answers at `address` (with TLS: where nothing does)."""
    host, _, port = address.split("://")[-1].rpartition(":")
    tls = os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true")
    try:
        with socket.create_connection((host.strip("[]") or port, int(port) if host else 10001), timeout=5) as s:
            s.sendall(b"" if tls else _HTTP2_HELLO)
            if tls or s.recv(9)[3:4] == b"\x04":
                return
        why = "something answers there, but no Ray head"
    except (OSError, ValueError) as e:  # ValueError: no port
        why = getattr(e, "strerror", None) or str(e)
    raise UserError(
        f"no Ray cluster answers at {address} ({why}); start its head with `ray start --head` (`ray status` there "
        "prints its address), or give --ray auto on a cluster node, or --ray alone for a local instance"
    )


class RayEngine:
    """Every call a Ray task with the resources it needs: one GPU, or `setup.threads` CPUs. Ray retries
    a task whose worker or node died (only after that process is gone), and the call resumes from its
    run folder. `address`: "local" starts a Ray instance here, "auto" joins the cluster this machine
    is part of, host:port joins that head; a Ray already connected (a notebook, a test) is used as it is.
    `device` None: a GPU per run when the cluster has GPUs (the driver itself may sit on a node without one)."""

    RETRIES = 3  # a lost worker or node; a call that raises is not retried: the sweep records its error

    def __init__(self, address: str, setup: WorkerSetup, device: str | None):
        import ray

        self.ray, self.started, self.setup, self.pending = ray, not ray.is_initialized(), setup, {}
        if self.started:
            self._connect(address)
        have = ray.cluster_resources()
        self.device = device or ("cuda" if have.get("GPU") else "cpu")
        if self.device.startswith("cuda") and (self.device != "cuda" or not have.get("GPU")):
            self.close()
            raise UserError(
                "--device cuda, but the Ray cluster has no GPU: use --device cpu, or add nodes with GPUs"
                if self.device == "cuda"
                else f"--device {self.device}: with --ray use --device cuda (Ray picks each run's GPU)"
            )
        gpus = self.device == "cuda"
        resources = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": setup.threads}
        self.task = ray.remote(_call).options(max_retries=self.RETRIES, **resources)
        self.slots = max(1, int(have["GPU"] if gpus else have.get("CPU", 1) // setup.threads))

    def _connect(self, address: str) -> None:
        """ray.init, in seconds: Ray's own tries limited, and loopback kept (Ray dials 127.0.0.1 or localhost at
        this machine's address instead, where a head bound to loopback, a cluster of this machine, does not listen)."""
        if address not in ("local", "auto"):
            _dial(address)
        limits = {} if address == "local" else {k: v for k, v in _JOIN_LIMITS.items() if k not in os.environ}
        os.environ.update(limits)
        self.ray._raylet.Config.initialize("")  # Ray read its settings from the environment at import: again
        services, sigterm = self.ray._private.services, signal.getsignal(signal.SIGTERM)
        rewrite = services.resolve_ip_for_localhost
        services.resolve_ip_for_localhost = rewrite if address == "local" else lambda host: host
        try:
            self.ray.init(address=address, logging_level=logging.WARNING, include_dashboard=False)
        except (ConnectionError, ValueError, RuntimeError) as e:
            # Ray sends its token only to clusters it found itself ("auto"), never to an explicit address
            fix = (
                "start a cluster's head with `ray start --head`, or give --ray HOST:PORT of one, or --ray "
                "alone for a local instance"
                if address in ("local", "auto")
                else "if the cluster uses Ray's token authentication (the default), set "
                "RAY_AUTH_MODE=token here and give this machine the head's token (~/.ray/auth_token or RAY_AUTH_TOKEN)"
            )
            raise UserError(f"could not start or join Ray at {address} ({str(e).splitlines()[0]}); {fix}") from None
        except SystemExit:  # ray.init swaps in sys.exit for SIGTERM: stop as the caller's handler says
            if callable(sigterm):
                sigterm(signal.SIGTERM, None)  # the CLI's stops as cleanly as Ctrl-C
            raise
        finally:
            services.resolve_ip_for_localhost = rewrite
            for name in limits:
                del os.environ[name]
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, sigterm)

    def submit(self, key, fn, *args):
        self.pending[self.task.remote(self.setup, self.device, fn, *args)] = key

    def next(self) -> Outcome:
        done = []
        while not done:  # in short waits: Ctrl-C and SIGTERM are handled between them
            done, _ = self.ray.wait(list(self.pending), num_returns=1, timeout=1.0)
        key = self.pending.pop(done[0])
        try:
            return key, self.ray.get(done[0]), None
        except self.ray.exceptions.RayTaskError as e:  # the call raised: hand back its own exception
            return key, None, e.cause if isinstance(e.cause, BaseException) else e
        except self.ray.exceptions.RayError as e:  # retries used up (the worker kept dying), or cancelled
            return key, None, WorkerDied(f"{type(e).__name__}: {str(e).splitlines()[0]}")

    def close(self):
        for ref in self.pending:  # stop them: no worker goes on writing into the sweep after its driver stopped
            self.ray.cancel(ref, force=True)
        self.pending = {}
        if self.started:
            self.ray.shutdown()


# ---- choosing one --------------------------------------------------------------------------------


def check_engine(jobs: int, ray: str | None) -> None:
    """Refuse what cannot work, before a sweep starts or writes anything."""
    if ray is None:
        if jobs < 1:
            raise UserError(f"--jobs must be at least 1, got {jobs}")
        return
    if dist.is_distributed():
        raise UserError(
            "--ray runs every run as a Ray task from one process, while torchrun starts one sweep per rank: "
            "run `st sweep --ray` without torchrun (torchrun suits one run on many GPUs: st finetune, share, adapt)"
        )
    try:
        import ray as ray_module
    except ImportError:
        raise UserError("--ray needs Ray, an optional extra: pip install 'st[ray]' (or pip install ray)") from None
    if ray not in ("local", "auto") and not ray_module.is_initialized():
        _dial(ray)


def open_engine(jobs: int, device: str | None, ray: str | None) -> Engine:
    """The engine for `jobs` runs at once on `device` (resolved by the caller: `st.dist.pick_device`), or
    on the Ray cluster at `ray` (device None: a GPU per run when the cluster has GPUs)."""
    check_engine(jobs, ray)
    if ray is not None:
        return RayEngine(ray, WorkerSetup.here(1), device)  # one thread per CPU run: many small runs fill the CPUs best
    if dist.is_distributed():
        if jobs > 1:
            log.info("under torchrun every run uses all ranks; --jobs %d is ignored", jobs)
        return InProcess(device)
    if device.startswith("cuda"):
        import torch

        # one process per visible GPU at most; a named GPU (cuda:1) is the user's choice: that one only
        jobs = 1 if device != "cuda" else max(1, min(jobs, torch.cuda.device_count()))
    if jobs == 1:
        return InProcess(device)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return LocalPool(jobs, WorkerSetup.here(max(1, cpus // jobs)), device)
