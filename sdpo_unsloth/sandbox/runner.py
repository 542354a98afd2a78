"""The parent side of `sdpo_unsloth.sandbox`: `Sandbox` starts confined children, feeds them a job,
follows them to the end (with time and output caps), kills what is left, and turns the child's report
into a `SandboxResult`. What the sandbox covers and what it does not is in the package docstring.
"""

from __future__ import annotations

import json
import marshal
import math
import os
import platform
import selectors
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

from . import slots
from .errors import SandboxError
from .results import (
    UNSET,
    Check,
    Isolation,
    IsolationLevel,
    Job,
    Limits,
    Report,
    SandboxResult,
    Status,
    check_results,
    ending,
    script_status,
)

HARNESS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "child.py")
LAYERS = frozenset({"uid", "landlock", "seccomp"})


# --- one run --------------------------------------------------------------------------------------------


class _Capped:
    """Keeps the first `cap` bytes of a stream and counts the rest."""

    def __init__(self, cap: int):
        self.cap, self.data, self.total = cap, bytearray(), 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.cap - len(self.data)
        if room > 0:
            self.data += chunk[:room]

    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


def _environment(workdir: str) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": workdir,
        "TMPDIR": workdir,
    }


class Sandbox:
    """Runs untrusted code, alone (`run`) or a batch in parallel (`run_many`), in confined children.

    Args:
        workers: parallel children (one uid slot each); default: the CPUs this process may use.
        limits: default `Limits` for every run.
        layers: confinement layers to apply where possible, a subset of `LAYERS`. Leave all on; drop
            one only to debug code that a layer refuses.
        uid_base: first uid to try for the slots (uids listed in /etc/passwd or /etc/group, or with
            running processes, or locked by another sandbox on this machine are skipped).
        python: interpreter for the children (default: this one).
        tmp_dir: where work directories are created (default: the system temp dir).

    Thread-safe. `close()` (or a ``with`` block) stops the worker threads and frees the uid slots.
    """

    def __init__(
        self,
        *,
        workers: int | None = None,
        limits: Limits | None = None,
        layers: Iterable[str] = LAYERS,
        uid_base: int = slots.DEFAULT_UID_BASE,
        python: str | None = None,
        tmp_dir: str | None = None,
    ):
        if not sys.platform.startswith("linux"):
            raise SandboxError(
                f"the sandbox needs Linux (process groups, rlimits, /proc); this is {sys.platform}"
            )
        self.layers = frozenset(layers)
        if not self.layers <= LAYERS:
            raise ValueError(f"`layers` must be a subset of {sorted(LAYERS)}, got {sorted(self.layers)}")
        if not 1 <= uid_base <= 2**31 - slots.UID_SEARCH:
            raise ValueError(f"`uid_base` must be a uid in [1, 2**31 - {slots.UID_SEARCH}], got {uid_base}")
        if workers is not None and workers < 1:
            raise ValueError(f"`workers` must be >= 1 (or None for one per CPU), got {workers}")
        self.workers = workers or max(1, min(len(os.sched_getaffinity(0)), 32))
        self.limits = limits or Limits()
        self.python = python or sys.executable
        if not self.python or not os.access(self.python, os.X_OK):
            raise SandboxError(
                f"no Python interpreter to run the sandbox with ({self.python!r}); pass `python=`"
            )
        self.tmp_dir = tmp_dir
        use_uid = "uid" in self.layers and os.geteuid() == 0
        self._seccomp = "seccomp" in self.layers and platform.machine() in ("x86_64", "AMD64")
        self._slots = slots.SlotPool(self.workers, uid_base if use_uid else None)
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._isolation: Isolation | None = None
        self._warned = False

    # -- public ---------------------------------------------------------------------------------------

    def run(
        self, code: str, checks: Sequence[Check] = (), *, stdin: str = "", limits: Limits | None = None
    ) -> SandboxResult:
        """Runs `code` once: as ``__main__`` on `stdin` when `checks` is empty, else against each check."""
        slot = self._slots.acquire()
        try:
            return self._execute(Job(code, tuple(checks), stdin), slot, limits or self.limits)
        finally:
            self._slots.release(slot)

    def run_many(self, jobs: Iterable[Job], *, limits: Limits | None = None) -> list[SandboxResult]:
        """Runs the jobs `workers` at a time; results come back in the order of `jobs`."""
        jobs = list(jobs)
        if len(jobs) <= 1 or self.workers == 1:
            return [self.run(j.code, j.checks, stdin=j.stdin, limits=limits) for j in jobs]
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="sdpo-sandbox")
            pool = self._pool
        futures = [pool.submit(self.run, j.code, j.checks, stdin=j.stdin, limits=limits) for j in jobs]
        return [f.result() for f in futures]

    @property
    def isolation(self) -> Isolation:
        """What this machine allows, measured once by a trivial run."""
        if self._isolation is None:
            self.run("pass")
        assert self._isolation is not None
        return self._isolation

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
        self._slots.close()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one child --------------------------------------------------------------------------------------

    def _payload(self, job: Job, limits: Limits, workdir: str, uid: int | None, result_fd: int) -> bytes:
        checks = []
        for i, check in enumerate(job.checks):
            if check.function is None:
                checks.append({"stdin": check.stdin or ""})
                continue
            args, kwargs = list(check.args), dict(check.kwargs or {})
            try:
                json.dumps([args, kwargs, None if check.expected is UNSET else check.expected])
            except (TypeError, ValueError) as exc:
                raise ValueError(
                    f"check {i}: arguments and expected value must be JSON values ({exc})"
                ) from None
            checks.append(
                {
                    "function": check.function,
                    "args": marshal.dumps(args, 4),
                    "kwargs": marshal.dumps(kwargs, 4),
                }
            )
        cpu = math.ceil(limits.timeout_s * (len(job.checks) + 1)) + 1
        return marshal.dumps(
            {
                "code": job.code,
                "mode": "checks" if job.checks else "script",
                "checks": checks,
                "stdin": job.stdin,
                "workdir": workdir,
                "result_fd": result_fd,
                "uid": uid,
                "seccomp": self._seccomp,
                "landlock": "landlock" in self.layers,
                "max_value_bytes": limits.max_output_bytes,
                "limits": {
                    "cpu": cpu,
                    "as": limits.memory_mb << 20,
                    "fsize": limits.max_file_mb << 20,
                    "nofile": limits.max_open_files,
                    "nproc": limits.max_processes,
                },
            },
            4,
        )

    def _execute(self, job: Job, slot: slots.Slot, limits: Limits) -> SandboxResult:
        if not isinstance(job.code, str):
            raise TypeError(f"code must be a str, got {type(job.code).__name__}")
        started = time.monotonic()
        workdir = tempfile.mkdtemp(prefix="sdpo-sandbox-", dir=self.tmp_dir)
        try:
            if slot.uid is not None:
                os.chown(workdir, slot.uid, slot.uid)
            read_fd, write_fd = os.pipe()
            try:
                payload = self._payload(job, limits, workdir, slot.uid, write_fd)
                proc = subprocess.Popen(
                    [self.python, "-I", "-S", HARNESS],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    pass_fds=(write_fd,),
                    cwd=workdir,
                    env=_environment(workdir),
                    start_new_session=True,
                )
            except BaseException:
                os.close(read_fd)
                raise
            finally:
                os.close(write_fd)
            try:
                report, out, err, timed_out = self._watch(proc, payload, read_fd, job, limits, slot)
            finally:
                os.close(read_fd)
            elapsed = time.monotonic() - started
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return self._result(job, limits, report, out, err, proc.returncode, timed_out, elapsed)

    def _watch(
        self,
        proc: subprocess.Popen[bytes],
        payload: bytes,
        read_fd: int,
        job: Job,
        limits: Limits,
        slot: slots.Slot,
    ) -> tuple[Report, _Capped, _Capped, bool]:
        """Feeds the job, follows the child until it ends or times out, then kills what is left.

        Whatever happens here (even KeyboardInterrupt), the child's process group and every process of
        the slot's uid are killed before this returns or raises.
        """
        out, err = _Capped(limits.max_output_bytes), _Capped(limits.max_output_bytes)
        report = Report(len(job.checks), limits, line_cap=2 * limits.max_output_bytes + 8192)
        sinks = {proc.stdout.fileno(): out.add, proc.stderr.fileno(): err.add, read_fd: report.feed}
        selector = selectors.DefaultSelector()
        exit_fd = slots.exit_fd(proc.pid)
        timed_out, grace_until, unsent = False, None, memoryview(payload)
        try:
            for fd in [*sinks, proc.stdin.fileno()]:
                os.set_blocking(fd, False)
            for fd in sinks:
                selector.register(fd, selectors.EVENT_READ)
            selector.register(proc.stdin.fileno(), selectors.EVENT_WRITE)
            if exit_fd is not None:
                selector.register(exit_fd, selectors.EVENT_READ)
            while True:
                if report.end and grace_until is None:  # let it `_exit` by itself, but not wait on threads
                    grace_until = time.monotonic() + 0.2
                remaining = (grace_until or report.deadline) - time.monotonic()
                if remaining <= 0:
                    timed_out = grace_until is None
                    break
                events = selector.select(min(remaining, 0.05) if exit_fd is None else remaining)
                if any(key.fd == exit_fd for key, _ in events) or (
                    exit_fd is None and not events and slots.has_exited(proc.pid)
                ):
                    break
                for key, mask in events:
                    if mask & selectors.EVENT_WRITE:
                        unsent = self._send(selector, proc, unsent)
                    else:
                        self._read(selector, key.fd, sinks)
        finally:
            slots.kill_group(proc.pid)  # the child is not reaped yet: its pid cannot be reused
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                raise SandboxError(
                    f"sandbox child {proc.pid} did not die after SIGKILL (stuck in the kernel?)"
                ) from None
            finally:
                if slot.uid is not None:
                    self._slots.sweep(slot)
                if exit_fd is not None:
                    os.close(exit_fd)
        try:  # every writer is dead now: read what is left up to EOF
            if not proc.stdin.closed:
                selector.unregister(proc.stdin.fileno())
                proc.stdin.close()
            if exit_fd is not None:
                selector.unregister(exit_fd)
            drain_until = time.monotonic() + 1.0
            while selector.get_map() and (left := drain_until - time.monotonic()) > 0:
                for key, _ in selector.select(left):
                    self._read(selector, key.fd, sinks)
        finally:
            selector.close()
            proc.stdout.close()
            proc.stderr.close()
            if not proc.stdin.closed:
                proc.stdin.close()
        return report, out, err, timed_out

    @staticmethod
    def _send(
        selector: selectors.BaseSelector, proc: subprocess.Popen[bytes], unsent: memoryview
    ) -> memoryview:
        """Writes the next part of the job to the child's stdin; closes it when all is sent."""
        try:
            unsent = unsent[os.write(proc.stdin.fileno(), unsent) :]
        except BlockingIOError:
            return unsent
        except BrokenPipeError:
            unsent = unsent[:0]  # died at start: its exit status tells
        if not unsent:
            selector.unregister(proc.stdin.fileno())
            proc.stdin.close()
        return unsent

    @staticmethod
    def _read(selector: selectors.BaseSelector, fd: int, sinks: dict[int, Callable[[bytes], None]]) -> None:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return
        if chunk:
            sinks[fd](chunk)
        else:
            selector.unregister(fd)

    def _result(
        self,
        job: Job,
        limits: Limits,
        report: Report,
        out: _Capped,
        err: _Capped,
        rc: int | None,
        timed_out: bool,
        elapsed: float,
    ) -> SandboxResult:
        if report.fatal is not None or report.ready is None:
            why = report.fatal or (
                f"no report within {limits.startup_timeout_s} s" if timed_out else f"exit status {rc}"
            )
            hint = ""
            if "uid drop" in why:
                hint = (
                    " This machine does not let root switch to an unprivileged uid; fix that, or accept weaker "
                    "isolation with Sandbox(layers={'landlock', 'seccomp'})."
                )
            raise SandboxError(
                f"the sandbox child could not start ({why}).{hint} Its stderr: {err.text()[-2000:]!r}"
            )
        isolation = Isolation(
            uid=report.ready.get("uid"),
            seccomp=bool(report.ready.get("seccomp")),
            landlock_abi=int(report.ready.get("landlock") or 0),
            notes=tuple(str(n) for n in report.ready.get("notes") or ()),
        )
        self._note_isolation(isolation)
        ended = ending(report, rc, timed_out, limits)
        before_tests = False
        if job.checks:
            checks, before_tests = check_results(job.checks, report, ended)
            first = next((c for c in checks if c.status is not Status.OK), None)
            status, error = (first.status, first.error) if first else (Status.OK, "")
        else:
            checks = ()
            status, error = script_status(report, ended)
        return SandboxResult(
            status=status,
            checks=tuple(checks),
            stdout=out.text(),
            stderr=err.text(),
            elapsed_s=elapsed,
            isolation=isolation,
            returncode=rc,
            error=error,
            truncated=out.total > out.cap or err.total > err.cap,
            before_tests=before_tests,
        )

    def _note_isolation(self, isolation: Isolation) -> None:
        self._isolation = isolation
        if isolation.level is not IsolationLevel.STRONG and not self._warned:
            self._warned = True
            warnings.warn(
                f"untrusted code runs with {isolation.description}. For strong isolation run the trainer as "
                "root on Linux x86_64 with a kernel that has Landlock (5.13+, enabled in the LSM list).",
                RuntimeWarning,
                stacklevel=5,
            )


# --- module-level convenience ---------------------------------------------------------------------------

_default: Sandbox | None = None
_default_lock = threading.Lock()


def default_sandbox() -> Sandbox:
    """The process-wide `Sandbox` used by `run` and `run_many` (created on first use)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Sandbox()
        return _default


def run(
    code: str, checks: Sequence[Check] = (), *, stdin: str = "", limits: Limits | None = None
) -> SandboxResult:
    """`Sandbox.run` on the shared default sandbox."""
    return default_sandbox().run(code, checks, stdin=stdin, limits=limits)


def run_many(jobs: Iterable[Job], *, limits: Limits | None = None) -> list[SandboxResult]:
    """`Sandbox.run_many` on the shared default sandbox."""
    return default_sandbox().run_many(jobs, limits=limits)
