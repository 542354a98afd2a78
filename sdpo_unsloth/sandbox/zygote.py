"""The parent's handle on one zygote: a pre-started harness (`child.py`) that forks a confined child
per run, so a run costs a ``fork`` instead of a fresh interpreter (measured in docs/benchmarks.md).

The zygote is started with ``subprocess.Popen`` (no ``preexec_fn``: no fork of the big trainer), in a new
session, with a scrubbed environment, and talks over one ``SOCK_SEQPACKET`` socket (protocol in
`child.py`). It never runs untrusted code: each run's child confines itself (Landlock, uid drop,
seccomp, rlimits) after the fork, so every run gets fresh process state and the full isolation.
Standard library only.
"""

from __future__ import annotations

import json
import marshal
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import time
from dataclasses import dataclass

from .errors import SandboxError

HARNESS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "child.py")
ENVIRONMENT = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}  # + HOME, TMPDIR per run


class ZygoteLost(Exception):
    """The zygote closed its socket or stopped answering; the caller starts a new one."""


@dataclass
class Exited:
    """How a run's child ended: its exit status (negative: signal) and the disk use of its work dir."""

    returncode: int | None
    disk_bytes: int = 0
    disk_files: int = 0
    quota: str = ""  # non-empty: the work dir hit its quota, in words


class Zygote:
    """One pre-started harness process. Not thread-safe: one run at a time (one per worker slot)."""

    def __init__(self, python: str, tmp_dir: str, *, tmpfs: bool, timeout_s: float):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [python, "-I", "-S", HARNESS, str(theirs.fileno()), tmp_dir, "1" if tmpfs else "0"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                pass_fds=(theirs.fileno(),),
                cwd="/",
                env=ENVIRONMENT,
                start_new_session=True,
            )
        finally:
            theirs.close()
        self.sock = ours
        try:
            ready = json.loads(self._receive(b"Z", timeout_s)[1:])
        except ZygoteLost:
            self.proc.kill()
            err = self.proc.communicate(timeout=10)[1].decode("utf-8", errors="replace")
            self.sock.close()
            raise SandboxError(
                f"the sandbox worker could not start (exit status {self.proc.returncode}); its stderr: "
                f"{err[-2000:]!r}"
            ) from None
        self.base: str = ready["base"]  # holds the runs' work dirs; removed when the zygote ends
        self.tmpfs: bool = bool(ready["tmpfs"])
        self.notes: tuple[str, ...] = tuple(ready["notes"])
        self.workdir = ""

    @property
    def exit_fd(self) -> int:
        """Readable once the running child has exited (or the zygote is gone)."""
        return self.sock.fileno()

    def start(
        self, fds: list[int], uid: int | None, quota_bytes: int, quota_files: int, timeout_s: float
    ) -> int:
        """Forks a child on `fds` (its stdin, stdout, stderr, result pipe); returns its pid (= its pgid)."""
        params = {"uid": uid, "quota_bytes": quota_bytes, "quota_files": quota_files}
        try:
            socket.send_fds(self.sock, [b"R" + marshal.dumps(params, 4)], fds)
        except OSError:
            raise ZygoteLost from None
        answer = self._receive(b"PE", timeout_s)
        if answer[:1] == b"E":
            raise SandboxError(f"the sandbox worker could not prepare a run: {answer[1:].decode()}")
        self.workdir = answer[5:].decode()
        return struct.unpack("=i", answer[1:5])[0]

    def exited(self, timeout_s: float) -> Exited:
        """Waits for the child's exit report (the zygote keeps it unreaped until `clean`)."""
        report = json.loads(self._receive(b"X", timeout_s)[1:])
        return Exited(report["rc"], report["bytes"], report["files"], report["quota"])

    def clean(self, timeout_s: float) -> bool:
        """Reaps the run's processes and removes its work dir; True if some descendant could not be ended."""
        try:
            self.sock.send(b"C")
        except OSError:
            raise ZygoteLost from None
        return self._receive(b"D", timeout_s)[1:] != b"\0"

    def close(self) -> None:
        self.sock.close()  # the zygote exits on EOF
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        finally:
            self.proc.stderr.close()
            shutil.rmtree(self.base, ignore_errors=True)  # left only by a zygote that was killed

    def _receive(self, kinds: bytes, timeout_s: float) -> bytes:
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                raise ZygoteLost(f"no answer from the sandbox worker within {timeout_s:g} s")
            try:
                message = self.sock.recv(1 << 16)
            except OSError:
                message = b""
            if not message:
                raise ZygoteLost("the sandbox worker exited")
            if message[:1] in kinds:
                return message
