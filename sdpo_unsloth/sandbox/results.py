"""Results of `sdpo_unsloth.sandbox`: what a run returns, how outputs compare, and how the child's
report becomes a result. Standard library only.

The child reports JSON lines on a pipe (``ready``, ``load``, ``start``/``done`` per check, ``exit``,
``end``). The untrusted code shares the child's process and can write to that pipe too, so `Report`
accepts records only in the legal order (one per state), values are re-parsed here as plain JSON, and
every comparison with an expected value happens here, in the trainer: nothing the child says can turn
a wrong answer into a pass.
"""

from __future__ import annotations

import enum
import json
import math
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "UNSET",
    "Check",
    "CheckResult",
    "Isolation",
    "IsolationLevel",
    "Job",
    "Limits",
    "SandboxResult",
    "Status",
    "outputs_equal",
    "values_equal",
]


class Status(enum.StrEnum):
    """Outcome of a run or of one check. `NOT_RUN` only appears on checks after a fatal one."""

    OK = "ok"
    WRONG = "wrong"  # ran, but the output differs from the expected one
    ERROR = "error"  # raised, did not compile, exited early, or the function is missing
    TIMEOUT = "timeout"  # wall-clock or CPU-time limit
    MEMORY = "memory"  # MemoryError under the address-space limit
    KILLED = "killed"  # died from a signal (segfault, abort, OOM killer)
    NOT_RUN = "not_run"


class IsolationLevel(enum.StrEnum):
    STRONG = "strong"  # separate uid + Landlock + seccomp
    PARTIAL = "partial"  # some of those layers
    MINIMAL = "minimal"  # resource limits, clean environment, temp dir and process group only


@dataclass(frozen=True)
class Isolation:
    """The confinement layers a child actually applied (it reports them before the untrusted code runs)."""

    uid: int | None  # the unprivileged uid it ran as, None when it kept the trainer's uid
    seccomp: bool
    landlock_abi: int  # 0 = no Landlock
    # how the work dir's byte and file quota holds: "tmpfs" (a size- and inode-limited tmpfs, exact) or
    # "watched" (measured every 10 ms and after the run: can overshoot by what is written in 10 ms)
    disk_quota: str = ""
    notes: tuple[str, ...] = ()

    @property
    def level(self) -> IsolationLevel:
        layers = (self.uid is not None) + self.seccomp + (self.landlock_abi > 0)
        if layers == 3:
            return IsolationLevel.STRONG
        return IsolationLevel.PARTIAL if layers else IsolationLevel.MINIMAL

    @property
    def network_blocked(self) -> bool:
        """True when no network socket can be opened (seccomp refuses ``socket()``)."""
        return self.seccomp

    @property
    def description(self) -> str:
        applied = ["rlimits", "clean environment", "temporary work directory", "process-group kill"]
        gaps = []
        if self.uid is not None:
            applied.append(
                f"unprivileged uid {self.uid} (its processes reaped, or killed by uid, afterwards)"
            )
        else:
            gaps.append(
                "runs as the trainer's own user (the trainer is not root): it can do what that user can "
                "unless Landlock/seccomp stop it, and only the process group is killed afterwards"
            )
        if self.landlock_abi:
            applied.append(
                f"Landlock ABI {self.landlock_abi} (writes only in the work dir, reads only libraries)"
            )
        else:
            gaps.append("no Landlock: world-readable files are readable, world-writable dirs (/tmp) writable")
        if self.seccomp:
            applied.append("seccomp (no sockets, execve, ptrace, namespaces, signals to others)")
        else:
            gaps.append(
                "no seccomp (x86_64 only): network sockets, execve (os.system) and ptrace are not refused"
            )
        if self.disk_quota == "tmpfs":
            applied.append("disk quota (work dir on a size- and file-limited tmpfs)")
        elif self.disk_quota:
            gaps.append(
                "no tmpfs for the work dir (needs root and a private mount namespace): its disk quota is "
                "measured every 10 ms and may overshoot by what the code writes in that time"
            )
        text = f"{self.level.value} isolation: " + ", ".join(applied)
        if gaps:
            text += ". Missing: " + "; ".join(gaps)
        return text + "".join(f". {note}" for note in self.notes)


@dataclass(frozen=True)
class Limits:
    """Resource limits for one run. The child's CPU-time limit is derived from `timeout_s`."""

    timeout_s: float = 2.0  # wall clock per check (or for the whole program in script mode)
    memory_mb: int = 512  # address space (RLIMIT_AS)
    max_output_bytes: int = 32_768  # kept of stdout, of stderr, and of each check's value
    max_file_mb: int = 16  # largest file the child may write (RLIMIT_FSIZE, at most `max_disk_mb`)
    max_processes: int = 8  # processes + threads of the slot uid (RLIMIT_NPROC)
    max_open_files: int = 64
    # The work dir's quota; a run that reaches it fails with "quota exceeded". No file grows past
    # `max_disk_mb` either (RLIMIT_FSIZE is the smaller of the two).
    max_disk_mb: int = 64  # bytes in the work dir, all files together (tmpfs size, or watched)
    max_files: int = 1_000  # files and directories in the work dir (a tmpfs allows up to 8 more)
    startup_timeout_s: float = 30.0  # for the interpreter to start and confine itself

    def __post_init__(self) -> None:
        if not (self.timeout_s > 0 and math.isfinite(self.timeout_s)):
            raise ValueError(f"`timeout_s` must be a positive number of seconds, got {self.timeout_s}")
        for name, low in (("memory_mb", 64), ("max_output_bytes", 256), ("max_file_mb", 1),
                          ("max_processes", 1), ("max_open_files", 16), ("max_disk_mb", 1),
                          ("max_files", 16)):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}")


class _Unset(enum.Enum):
    UNSET = "UNSET"


UNSET = _Unset.UNSET


@dataclass(frozen=True)
class Check:
    """One test: call ``function(*args, **kwargs)``, or (``function=None``) run the program on `stdin`.

    `expected` (a JSON value, or the expected stdout text) stays in the parent; leave it `UNSET` to only
    collect the output.

    >>> Check("total", ([1, 2, 3],), expected=6).describe_input()
    '[1, 2, 3]'
    >>> Check(stdin="1 2\\n", expected="3").describe_input()
    "'1 2\\\\n'"
    """

    function: str | None = None
    args: Sequence[Any] = ()
    kwargs: dict[str, Any] | None = None
    stdin: str | None = None
    expected: Any = UNSET

    def __post_init__(self) -> None:
        if self.function is not None and (
            not isinstance(self.function, str) or not self.function.isidentifier()
        ):
            raise ValueError(f"`function` must be a Python identifier, got {self.function!r}")
        if self.function is not None and self.stdin is not None:
            raise ValueError(
                "a Check is either a function call (`function`) or a program run (`stdin`), not both"
            )
        if self.function is None and self.expected is not UNSET and not isinstance(self.expected, str):
            raise ValueError(f"a stdin/stdout Check expects stdout text, got {type(self.expected).__name__}")

    def describe_input(self, limit: int = 200) -> str:
        """The input as Python-literal text, shortened to about `limit` characters."""
        if self.function is None:
            return _shorten(repr(self.stdin or ""), limit)
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in (self.kwargs or {}).items()]
        text = parts[0] if len(parts) == 1 and not self.kwargs else "(" + ", ".join(parts) + ")"
        return _shorten(text, limit)


@dataclass(frozen=True)
class CheckResult:
    status: Status
    got: Any = None  # the returned JSON value, or the captured stdout text; None when it did not finish
    error: str = ""  # one line from the child (untrusted text: quote it before showing it to a model)
    line: int | None = None  # line of the untrusted code where the error was raised
    # for ERROR: "error" (raised), "exit" (SystemExit), "missing" (no such function), "type" (not a JSON
    # value), "died" (the process ended without a report, e.g. os._exit)
    kind: str = ""


@dataclass(frozen=True)
class SandboxResult:
    status: Status  # first non-ok check's status (or the program's, in script mode)
    checks: tuple[CheckResult, ...]
    stdout: str
    stderr: str
    elapsed_s: float
    isolation: Isolation
    returncode: int | None = None  # negative: killed by that signal
    error: str = ""  # the first failure, in words (untrusted text)
    truncated: bool = False  # stdout or stderr exceeded `Limits.max_output_bytes`
    before_tests: bool = False  # failed (compile, top-level code, exit, timeout) before any check started
    disk_bytes: int = 0  # what the work dir held when the run ended (removed since)
    disk_files: int = 0

    @property
    def passed(self) -> int:
        return sum(c.status is Status.OK for c in self.checks)


@dataclass(frozen=True)
class Job:
    code: str
    checks: Sequence[Check] = ()
    stdin: str = ""


# --- comparisons (always in the parent, on plain JSON values) -----------------------------------------


def values_equal(got: Any, expected: Any) -> bool:
    """Strict equality of JSON values: types must agree (bool is not int); int/float compare with 1e-9.

    >>> values_equal(6, 6.0), values_equal(True, 1), values_equal([1, [2]], [1, [2]])
    (True, False, True)
    """
    if isinstance(expected, bool) or isinstance(got, bool):
        return type(got) is type(expected) and got == expected
    if isinstance(expected, int | float) and isinstance(got, int | float):
        if isinstance(expected, int) and isinstance(got, int):
            return got == expected
        return math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-9)
    if isinstance(expected, list):
        return isinstance(got, list) and len(got) == len(expected) and all(map(values_equal, got, expected))
    if isinstance(expected, dict):
        return (
            isinstance(got, dict)
            and got.keys() == expected.keys()
            and all(values_equal(got[k], expected[k]) for k in expected)
        )
    return type(got) is type(expected) and got == expected  # str, None


def outputs_equal(got: str, expected: str) -> bool:
    """Stdout comparison ignoring trailing spaces on lines and trailing blank lines.

    >>> outputs_equal("3 \\n\\n", "3")
    True
    """

    def norm(text: str) -> list[str]:
        lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
        while lines and not lines[-1]:
            lines.pop()
        return lines

    return norm(got) == norm(expected)


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(limit - 3, 0)] + "..."


# --- the child's report -------------------------------------------------------------------------------


class Report:
    """The child's report, read as it arrives: records are accepted only in the legal order, at most one
    per state, and each accepted one pushes the wall-clock deadline on by `Limits.timeout_s`."""

    def __init__(self, n_checks: int, limits: Limits, line_cap: int):
        self.n, self.limits, self.line_cap = n_checks, limits, line_cap
        self.buffer = bytearray()
        self.ready: dict | None = None
        self.fatal: str | None = None
        self.load: dict | None = None
        self.started = -1
        self.done: dict[int, dict] = {}
        self.exit: dict | None = None
        self.end = False
        self.deadline = time.monotonic() + limits.startup_timeout_s

    def feed(self, chunk: bytes) -> None:
        self.buffer += chunk
        while (cut := self.buffer.find(b"\n")) >= 0:
            line = bytes(self.buffer[:cut])
            del self.buffer[: cut + 1]
            if len(line) <= self.line_cap:
                self._record(line)
        if len(self.buffer) > self.line_cap:
            self.buffer.clear()  # an over-long line is dropped; the next newline resynchronises

    def _record(self, line: bytes) -> None:
        try:
            record = json.loads(line)
            event = record["ev"]
        except (ValueError, RecursionError, TypeError, KeyError):
            return
        if self.ready is None:
            if event == "ready":
                self.ready = record
            elif event == "fatal":
                self.fatal = str(record.get("error"))
        elif event == "load" and self.load is None and self.started < 0:
            self.load = record
        elif event == "start" and record.get("i") == self.started + 1 and self.started + 1 < self.n:
            self.started += 1
        elif event == "done" and record.get("i") == self.started >= 0 and self.started not in self.done:
            self.done[self.started] = record
        elif event == "exit" and self.exit is None:
            self.exit = record
        elif event == "end":
            self.end = True
            return
        else:
            return
        if self.fatal is None:
            self.deadline = time.monotonic() + self.limits.timeout_s


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def ending(report: Report, rc: int | None, timed_out: bool, limits: Limits) -> CheckResult:
    """How the child ended when it did not report a result itself (used for the unfinished check)."""
    if timed_out:
        return CheckResult(Status.TIMEOUT, error=f"timed out after {limits.timeout_s:g} s")
    if rc is not None and rc < 0:
        if -rc == signal.SIGXCPU:
            return CheckResult(Status.TIMEOUT, error="CPU time limit exceeded")
        return CheckResult(Status.KILLED, error=f"crashed ({_signal_name(-rc)})")
    if report.end:
        return CheckResult(Status.ERROR, error="did not finish", kind="died")
    return CheckResult(Status.ERROR, error=f"the process exited (status {rc}) before finishing", kind="died")


def _failure(record: dict) -> CheckResult:
    kind = record.get("kind")
    status = Status.MEMORY if kind == "memory" else Status.ERROR
    line = record.get("line") if isinstance(record.get("line"), int) else None
    kind = str(record.get("kind", "error"))[:20] if status is Status.ERROR else ""
    return CheckResult(status, error=str(record.get("error", ""))[:4000], line=line, kind=kind)


def check_results(
    checks: Sequence[Check], report: Report, ended: CheckResult
) -> tuple[list[CheckResult], bool]:
    """Per-check results, and whether the code failed before any check started."""
    load = report.load
    if load is not None and not load.get("ok"):
        failed = _failure(load)
        if failed.kind == "exit":
            text = f"the program called sys.exit() ({failed.error}) before the tests ran"
            failed = CheckResult(Status.ERROR, error=text, line=failed.line, kind="exit")
        return [failed] * len(checks), True
    if report.started < 0 and load is None:  # never got through compiling / top-level code
        if ended.status is Status.TIMEOUT:
            ended = CheckResult(Status.TIMEOUT, error=f"{ended.error} before the tests ran (top-level code)")
        return [ended] * len(checks), True
    results = []
    for i, check in enumerate(checks):
        record = report.done.get(i)
        if record is None:
            results.append(
                ended
                if i == report.started or (i == 0 and report.started < 0)
                else CheckResult(Status.NOT_RUN)
            )
        elif not record.get("ok"):
            results.append(_failure(record))
        else:
            results.append(_judge(check, record))
    return results, False


def _judge(check: Check, record: dict) -> CheckResult:
    if check.function is None:
        got = str(record.get("value", ""))
        if check.expected is UNSET or outputs_equal(got, check.expected):
            return CheckResult(Status.OK, got=got)
        return CheckResult(Status.WRONG, got=got)
    try:
        got = json.loads(str(record.get("value_json")))
    except (ValueError, RecursionError):
        return CheckResult(Status.ERROR, error="returned a value that is not valid JSON")
    if check.expected is UNSET or values_equal(
        got, json.loads(json.dumps(check.expected))
    ):  # tuples -> lists
        return CheckResult(Status.OK, got=got)
    return CheckResult(Status.WRONG, got=got)


def script_status(report: Report, ended: CheckResult) -> tuple[Status, str]:
    if report.load is not None and not report.load.get("ok"):
        failed = _failure(report.load)
        return failed.status, failed.error
    if report.exit is not None:
        if report.exit.get("ok"):
            return Status.OK, ""
        failed = _failure(report.exit)
        if report.exit.get("kind") == "exit":
            return Status.ERROR, f"exited with status {report.exit.get('code')}"
        return failed.status, failed.error
    return ended.status, ended.error
