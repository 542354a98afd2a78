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
    CheckResult,
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
from .zygote import Exited, Zygote, ZygoteLost

LAYERS = frozenset({"uid", "landlock", "seccomp", "tmpfs"})


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
        layers: confinement layers to apply where possible, a subset of `LAYERS` (``uid``, ``landlock``,
            ``seccomp``, and ``tmpfs`` for the work dir's quota; without it the quota is watched). Leave
            all on; drop one only to debug code that a layer refuses.
        uid_base: first uid to try for the slots (uids listed in /etc/passwd or /etc/group, or with
            running processes, or locked by another sandbox on this machine are skipped).
        python: interpreter for the children (default: this one).
        tmp_dir: where work directories are created (default: the system temp dir).
        prefork: keep one zygote per slot that forks a child per run (default, ~1 fork per run); False
            starts a fresh zygote interpreter for every run (the cost of an interpreter start per run,
            for debugging or a machine where a long-lived helper process is unwelcome).

    Thread-safe. `close()` (or a ``with`` block) stops the worker threads and zygotes and frees the uid slots.
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
        prefork: bool = True,
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
        self.tmp_dir = os.path.realpath(tmp_dir or tempfile.gettempdir())
        self.prefork = prefork
        use_uid = "uid" in self.layers and os.geteuid() == 0
        self._seccomp = "seccomp" in self.layers and platform.machine() in ("x86_64", "AMD64")
        self._slots = slots.SlotPool(self.workers, uid_base if use_uid else None)
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._isolation: Isolation | None = None
        self._zygote_notes: tuple[str, ...] = ()
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
        for slot in self._slots.close():
            if slot.zygote is not None:
                slot.zygote.close()
                slot.zygote = None

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one child --------------------------------------------------------------------------------------

    def _payload(self, job: Job, limits: Limits, uid: int | None) -> bytes:
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
                "uid": uid,
                "seccomp": self._seccomp,
                "landlock": "landlock" in self.layers,
                "max_value_bytes": limits.max_output_bytes,
                "limits": {
                    "cpu": cpu,
                    "as": limits.memory_mb << 20,
                    "fsize": min(limits.max_file_mb, limits.max_disk_mb) << 20,  # no file beyond the quota
                    "nofile": limits.max_open_files,
                    "nproc": limits.max_processes,
                },
            },
            4,
        )

    def _zygote(self, slot: slots.Slot, limits: Limits) -> Zygote:
        if slot.zygote is None:
            slot.zygote = Zygote(
                self.python, self.tmp_dir, tmpfs="tmpfs" in self.layers and os.geteuid() == 0,
                timeout_s=limits.startup_timeout_s,
            )  # fmt: skip
            self._zygote_notes = slot.zygote.notes
        return slot.zygote

    def _execute(self, job: Job, slot: slots.Slot, limits: Limits) -> SandboxResult:
        if not isinstance(job.code, str):
            raise TypeError(f"code must be a str, got {type(job.code).__name__}")
        started = time.monotonic()
        payload = self._payload(job, limits, slot.uid)
        pipes = [os.pipe() for _ in range(4)]  # the child's stdin, stdout, stderr and result pipe
        theirs = [pipes[0][0], pipes[1][1], pipes[2][1], pipes[3][1]]
        ours = [pipes[0][1], pipes[1][0], pipes[2][0], pipes[3][0]]
        to_close = list(ours)
        try:
            try:
                zygote, pid = self._start(slot, theirs, limits)
            finally:
                for fd in theirs:
                    os.close(fd)
            to_close.remove(ours[0])  # `_watch` closes the child's stdin when the job is sent
            report, out, err, timed_out, exited = self._watch(zygote, pid, ours, payload, job, limits, slot)
        finally:
            for fd in to_close:
                os.close(fd)
            if not self.prefork:
                self._drop_zygote(slot)
        elapsed = time.monotonic() - started
        return self._result(job, limits, report, out, err, exited, timed_out, elapsed)

    def _start(self, slot: slots.Slot, fds: list[int], limits: Limits) -> tuple[Zygote, int]:
        """Has the slot's zygote fork a child on `fds`; a zygote found dead is replaced once."""
        for attempt in range(2):
            zygote = self._zygote(slot, limits)
            try:
                return zygote, zygote.start(
                    fds, slot.uid, limits.max_disk_mb << 20, limits.max_files, limits.startup_timeout_s
                )
            except ZygoteLost:
                self._drop_zygote(slot)
                if attempt:  # (nothing of the slot's uid is left: each run ends reaped or swept)
                    raise SandboxError(
                        "the sandbox worker stopped answering before the run started"
                    ) from None
        raise AssertionError("unreachable")

    def _drop_zygote(self, slot: slots.Slot) -> None:
        if slot.zygote is not None:
            slot.zygote.close()
            slot.zygote = None

    def _finish(self, zygote: Zygote, pid: int, exited: Exited | None, slot: slots.Slot) -> Exited:
        """Kills the run's process group, then has the zygote reap it and remove the work dir; kills by
        uid whatever the zygote could not end. A lost zygote is replaced at the next run."""
        slots.kill_group(pid)  # the child is not reaped yet: its pid (and group) cannot be reused
        try:
            if exited is None:
                exited = zygote.exited(timeout_s=10)
            left = zygote.clean(timeout_s=10)
        except ZygoteLost:
            self._drop_zygote(slot)  # also removes what its runs left on disk
            exited, left = exited or Exited(None), True
        if left and slot.uid is not None:
            self._slots.sweep(slot)
        return exited

    def _watch(
        self,
        zygote: Zygote,
        pid: int,
        fds: list[int],
        payload: bytes,
        job: Job,
        limits: Limits,
        slot: slots.Slot,
    ) -> tuple[Report, _Capped, _Capped, bool, Exited]:
        """Feeds the job, follows the child until it ends or times out, then kills what is left.

        Whatever happens here (even KeyboardInterrupt), the child's process group is killed and its
        processes reaped (or killed by uid) before this returns or raises.
        """
        stdin, stdout, stderr, results = fds
        out, err = _Capped(limits.max_output_bytes), _Capped(limits.max_output_bytes)
        report = Report(len(job.checks), limits, line_cap=2 * limits.max_output_bytes + 8192)
        sinks = {stdout: out.add, stderr: err.add, results: report.feed}
        selector = selectors.DefaultSelector()
        timed_out, grace_until, unsent, exited = False, None, memoryview(payload), None
        stdin_open = True
        try:
            for fd in fds:
                os.set_blocking(fd, False)
            for fd in sinks:
                selector.register(fd, selectors.EVENT_READ)
            selector.register(stdin, selectors.EVENT_WRITE)
            selector.register(zygote.exit_fd, selectors.EVENT_READ)
            while True:
                if report.end and grace_until is None:  # let it `_exit` by itself, but not wait on threads
                    grace_until = time.monotonic() + 0.2
                remaining = (grace_until or report.deadline) - time.monotonic()
                if remaining <= 0:
                    timed_out = grace_until is None
                    break
                events = selector.select(remaining)
                if any(key.fd == zygote.exit_fd for key, _ in events):
                    break
                for key, mask in events:
                    if mask & selectors.EVENT_WRITE:
                        unsent = self._send(selector, stdin, unsent)
                        stdin_open = bool(unsent)
                    else:
                        self._read(selector, key.fd, sinks)
        finally:
            if stdin_open:
                selector.unregister(stdin)
                os.close(stdin)
            exited = self._finish(zygote, pid, exited, slot)
        try:  # every writer is dead now: read what is left up to EOF
            selector.unregister(zygote.exit_fd)
            drain_until = time.monotonic() + 1.0
            while selector.get_map() and (left := drain_until - time.monotonic()) > 0:
                for key, _ in selector.select(left):
                    self._read(selector, key.fd, sinks)
        finally:
            selector.close()
        return report, out, err, timed_out, exited

    @staticmethod
    def _send(selector: selectors.BaseSelector, fd: int, unsent: memoryview) -> memoryview:
        """Writes the next part of the job to the child's stdin; stops watching it when all is sent."""
        try:
            unsent = unsent[os.write(fd, unsent) :]
        except BlockingIOError:
            return unsent
        except BrokenPipeError:
            unsent = unsent[:0]  # died at start: its exit status tells
        if not unsent:
            selector.unregister(fd)
            os.close(fd)  # end of file: the child starts
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
        exited: Exited,
        timed_out: bool,
        elapsed: float,
    ) -> SandboxResult:
        rc = exited.returncode
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
            disk_quota=str(report.ready.get("disk") or ""),
            notes=tuple(str(n) for n in report.ready.get("notes") or ()) + self._zygote_notes,
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
        if exited.quota:  # the work dir hit its quota: the run fails, whatever the code reported
            error = f"quota exceeded: {exited.quota}"
            status, checks = (
                Status.ERROR,
                tuple(CheckResult(Status.ERROR, error=error, kind="quota") for _ in checks),
            )
        return SandboxResult(
            disk_bytes=exited.disk_bytes,
            disk_files=exited.disk_files,
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
