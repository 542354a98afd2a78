"""Worker slots of `sdpo_unsloth.sandbox`: one dedicated unprivileged uid each, and killing by uid.

A slot's uid is claimed only if no user or group of that id exists, no process runs as it, and no
other sandbox on this machine holds it (an ``flock`` on ``/run/sdpo_unsloth-sandbox-0/<uid>.lock``,
released when the holder exits). After every run all processes of the uid are killed and the slot is
reused only once none is left; a uid whose processes cannot be cleared is retired and replaced.
Standard library only, Linux only.
"""

from __future__ import annotations

import fcntl
import grp
import os
import pwd
import queue
import signal
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

from .errors import SandboxError

DEFAULT_UID_BASE = 62_400  # below 65534 (nobody) so that it also maps inside a 16-bit user namespace
UID_SEARCH = 2_000


@dataclass
class Slot:
    uid: int | None  # None: run as the trainer's own uid (not root, or the uid layer is off)
    lock_fd: int | None = None
    zygote: Any = None  # the slot's pre-started harness (`zygote.Zygote`), started on first use


# --- processes ------------------------------------------------------------------------------------------


def _field(data: bytes, key: bytes) -> bytes:
    start = data.find(key)
    if start < 0:
        return b""
    start += len(key)
    end = data.find(b"\n", start)
    return data[start : end if end >= 0 else len(data)]


def _status_fields(pid: str) -> tuple[set[int], bool] | None:
    """(uids of the process, alive) from ``/proc/<pid>/status``; None if it is gone."""
    try:
        fd = os.open(f"/proc/{pid}/status", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    uids = {int(x) for x in _field(data, b"\nUid:").split()}
    state = _field(data, b"\nState:").strip()[:1]
    threads = int(_field(data, b"\nThreads:") or 1)
    # A zombie leader whose other threads still run is alive; a plain zombie (or dead task) is not.
    alive = state not in (b"Z", b"X") or threads > 1
    return uids, alive


def processes_of(uid: int, *, zombies: bool = False) -> list[int]:
    """Pids of live processes (and unreaped zombies if `zombies`) with `uid` as any of their uids."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _status_fields(name)
            if fields is not None and uid in fields[0] and (fields[1] or zombies):
                found.append(int(name))
    return found


def _kill_exact(pid: int, uid: int) -> None:
    """SIGKILLs `pid` only if it still runs as `uid` (a pidfd pins it against pid reuse)."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    try:
        fields = _status_fields(str(pid))
        if fields is None or uid not in fields[0]:
            return
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    finally:
        if pidfd is not None:
            os.close(pidfd)


def kill_uid(uid: int, timeout_s: float = 3.0) -> bool:
    """Kills every live process of `uid` until none is left; False if some survive `timeout_s`.

    Killed processes can linger as zombies until init reaps them (up to seconds on some machines); they
    still count against RLIMIT_NPROC, which is why `SlotPool` parks such a uid instead of reusing it.
    """
    deadline = time.monotonic() + timeout_s
    while pids := processes_of(uid):
        if time.monotonic() > deadline:
            return False
        for pid in pids:
            _kill_exact(pid, uid)
        time.sleep(0.002)
    return True


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def exit_fd(pid: int) -> int | None:
    """A pidfd that becomes readable when child `pid` exits, or None where pidfds are missing."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def has_exited(pid: int) -> bool:
    """Whether child `pid` has exited, without reaping it (its pid and group stay reserved)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


# --- uid slots ------------------------------------------------------------------------------------------


def _lock_dir() -> str:
    euid = os.geteuid()
    for base in ("/run", tempfile.gettempdir()):
        path = os.path.join(base, f"sdpo_unsloth-sandbox-{euid}")
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError:
            continue
        info = os.lstat(path)
        if stat.S_ISDIR(info.st_mode) and info.st_uid == euid and not info.st_mode & 0o022:
            return path
    raise SandboxError(
        "cannot create a private lock directory for sandbox uids in /run or the temp dir; make one of "
        "them writable by root"
    )


def _uid_unused(uid: int) -> bool:
    for lookup in (pwd.getpwuid, grp.getgrgid):
        try:
            lookup(uid)
            return False
        except KeyError:
            pass
    return True


_claim_lock = threading.Lock()


def claim_uid(start: int) -> tuple[int, int]:
    """Claims the first free uid from `start`: returns it and the fd holding its machine-wide lock."""
    with _claim_lock:
        directory = _lock_dir()
        for uid in range(start, start + UID_SEARCH):
            if not _uid_unused(uid):
                continue
            fd = os.open(os.path.join(directory, f"{uid}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            if processes_of(uid, zombies=True):  # in use (or not yet reaped): never ours to kill
                os.close(fd)
                continue
            return uid, fd
    raise SandboxError(
        f"no free uid for a sandbox slot in [{start}, {start + UID_SEARCH}); pass another `uid_base`"
    )


class SlotPool:
    """`n` slots, each with its own uid when `uid_base` is given (claimed on first use).

    A uid with processes left after a run (zombies waiting for init) is parked, and the slot takes a
    parked uid that has become empty, or claims a new one: a uid is reused only when nothing of it is
    left, so a fork bomb cannot make the next run's forks fail.
    """

    def __init__(self, n: int, uid_base: int | None):
        self.uid_base = uid_base
        self._free: queue.SimpleQueue[Slot] = queue.SimpleQueue()
        self._all = [Slot(None) for _ in range(n)]
        self._parked: list[tuple[int, int]] = []  # (uid, lock fd)
        self._lock = threading.Lock()
        for slot in self._all:
            self._free.put(slot)

    def acquire(self) -> Slot:
        slot = self._free.get()
        if self.uid_base is not None and slot.uid is None:
            try:
                slot.uid, slot.lock_fd = self._clean_parked() or claim_uid(self.uid_base)
            except BaseException:
                self._free.put(slot)
                raise
        return slot

    def release(self, slot: Slot) -> None:
        self._free.put(slot)

    def _clean_parked(self) -> tuple[int, int] | None:
        with self._lock:
            for i, (uid, _fd) in enumerate(self._parked):
                if not processes_of(uid, zombies=True):
                    return self._parked.pop(i)
        return None

    def sweep(self, slot: Slot) -> None:
        """Kills the slot's processes. Parks its uid if zombies remain; retires it if processes survive."""
        assert slot.uid is not None and slot.lock_fd is not None
        if not kill_uid(slot.uid):
            os.close(slot.lock_fd)  # never reused by this process; other processes skip it while it runs
            self.uid_base = max(self.uid_base or 0, slot.uid + 1)
        elif processes_of(slot.uid, zombies=True):
            with self._lock:
                self._parked.append((slot.uid, slot.lock_fd))
        else:
            return
        slot.uid, slot.lock_fd = None, None

    def close(self) -> list[Slot]:
        """Frees the uids; returns the slots (for their zygotes)."""
        with self._lock:
            held = [(s.uid, s.lock_fd) for s in self._all] + self._parked
            self._parked = []
            for slot in self._all:
                slot.uid, slot.lock_fd = None, None
        for _, fd in held:
            if fd is not None:
                os.close(fd)
        return list(self._all)
