"""The harness of `sdpo_unsloth.sandbox`: a zygote that forks one child per run; the child confines
itself, then runs the untrusted code.

The parent starts it as ``python -I -S child.py <socket fd> <tmp dir> <tmpfs 0/1>`` (a fresh, small
interpreter: no fork of the trainer) in a new session, with a scrubbed environment; the zygote loop at
the end of this file serves runs. Each forked child reads one job on its stdin and, before any untrusted
byte runs, in order:

1. sets ``no_new_privs`` and restricts itself with Landlock (when the kernel has it): writes only below
   the work directory, reads only from the Python standard library, system libraries and the work
   directory; no TCP bind/connect (ABI 4+); no signals or abstract unix sockets outside (ABI 6+);
2. drops to the slot's unprivileged uid/gid with no supplementary groups (when asked, i.e. the parent is
   root), and refuses to go on if the drop did not take;
3. installs a seccomp filter (x86_64 only) that refuses ``socket``, ``execve``, ``ptrace``, namespace
   and mount calls, ``io_uring``, ``setsid``/``setpgid`` and signals to any other process;
4. sets its resource limits (address space, CPU seconds, file size, open files, processes, no core).

It reports what it applied in a ``ready`` record on the result pipe, before the untrusted code runs,
so the code cannot change that report. Records are JSON lines: ``ready``, ``load``, ``start``/``done``
per check, ``exit`` (script mode) and ``end``. The untrusted code shares this process and can write to
the same pipe, so the parent trusts only values, never verdicts: expected outputs never enter this
process and every comparison happens in the parent.

Stdlib only; imported as a module only by tests (for the seccomp program).
"""

from __future__ import annotations

import builtins
import ctypes
import fcntl
import gc
import marshal
import os
import resource
import select
import shutil
import socket
import stat
import struct
import sys
import time

# --- seccomp (x86_64) -------------------------------------------------------------------------------

AUDIT_ARCH_X86_64 = 0xC000003E
_X32_SYSCALL_BIT = 0x40000000
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
_RET_KILL_PROCESS = 0x80000000
_EPERM, _ENOSYS = 1, 38
# BPF opcodes: load word at absolute offset, jumps on equal / greater-or-equal / bits set, return.
_LD_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
# struct seccomp_data: nr at 0, arch at 4, args[i] at 16 + 8 * i (low 32 bits first on x86_64).
_NR, _ARCH, _ARG0 = 0, 4, 16

# x86_64 syscall numbers refused with EPERM.
DENIED_SYSCALLS = {
    "socket": 41,
    "execve": 59,
    "execveat": 322,
    "ptrace": 101,
    "process_vm_readv": 310,
    "process_vm_writev": 311,
    "setsid": 112,
    "setpgid": 109,
    "tkill": 200,
    "rt_sigqueueinfo": 129,
    "rt_tgsigqueueinfo": 297,
    "pidfd_open": 434,
    "pidfd_send_signal": 424,
    "pidfd_getfd": 438,
    "unshare": 272,
    "setns": 308,
    "mount": 165,
    "umount2": 166,
    "pivot_root": 155,
    "chroot": 161,
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "mount_setattr": 442,
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
    "bpf": 321,
    "perf_event_open": 298,
    "userfaultfd": 323,
    "keyctl": 250,
    "add_key": 248,
    "request_key": 249,
    "personality": 135,
}
_KILL, _TGKILL, _CLONE, _CLONE3 = 62, 234, 56, 435
# CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET
_CLONE_NAMESPACES = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000


def seccomp_program(own_pid: int) -> list[tuple[int, int, int, int]]:
    """The filter as ``(code, jt, jf, k)`` BPF instructions.

    Refuses (EPERM) the calls in `DENIED_SYSCALLS`, x32-ABI calls, ``clone`` with namespace flags, and
    ``kill``/``tgkill`` aimed at any process but ``own_pid``; answers ``clone3`` with ENOSYS so the C
    library falls back to ``clone`` (whose flags a filter can read); kills the process on a foreign
    architecture; allows everything else.
    """
    code: list[tuple[int, int | str, int | str, int]] = []  # jump targets are labels until resolved
    labels: dict[str, int] = {}

    def op(opcode: int, k: int, jt: int | str = 0, jf: int | str = 0) -> None:
        code.append((opcode, jt, jf, k))

    op(_LD_ABS, _ARCH)
    op(_JEQ, AUDIT_ARCH_X86_64, 0, "kill")
    op(_LD_ABS, _NR)
    op(_JGE, _X32_SYSCALL_BIT, "deny", 0)
    for nr in sorted(DENIED_SYSCALLS.values()):
        op(_JEQ, nr, "deny", 0)
    op(_JEQ, _CLONE3, "enosys", 0)
    op(_JEQ, _KILL, "own_pid", 0)
    op(_JEQ, _TGKILL, "own_pid", 0)
    op(_JEQ, _CLONE, "clone", 0)
    op(_RET, _RET_ALLOW)
    labels["own_pid"] = len(code)
    op(_LD_ABS, _ARG0)  # pid_t is 32 bits: the kernel ignores the high half
    op(_JEQ, own_pid, "allow", "deny")
    labels["clone"] = len(code)
    op(_LD_ABS, _ARG0)
    op(_JSET, _CLONE_NAMESPACES, "deny", "allow")
    for name, value in (
        ("allow", _RET_ALLOW),
        ("deny", _RET_ERRNO | _EPERM),
        ("enosys", _RET_ERRNO | _ENOSYS),
        ("kill", _RET_KILL_PROCESS),
    ):
        labels[name] = len(code)
        op(_RET, value)

    program = []
    for index, (opcode, jt, jf, k) in enumerate(code):
        offsets = [labels[t] - index - 1 if isinstance(t, str) else t for t in (jt, jf)]
        if not all(0 <= off <= 255 for off in offsets):
            raise ValueError(f"seccomp jump out of range at instruction {index}")
        program.append((opcode, offsets[0], offsets[1], k))
    return program


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


_LIBC: list[ctypes.CDLL] = []  # loaded once by the zygote, inherited by every child


def _libc() -> ctypes.CDLL:
    if _LIBC:
        return _LIBC[0]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    libc.prctl.restype = ctypes.c_int
    libc.syscall.restype = ctypes.c_long
    _LIBC.append(libc)
    return libc


def _check(result: int, what: str) -> None:
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


_SECCOMP: list = []  # [packed program with a pid marker, the ctypes buffer type of its size]
_PID_MARK = 0x5EC0FFEE


def _seccomp_template() -> tuple[bytes, type]:
    """`seccomp_program` packed, with a marker for the pid, and a ctypes array type of its size: built once
    (in the zygote) and copied per child. A child that made the array type itself would spend ~0.1 ms on it."""
    if not _SECCOMP:
        template = b"".join(struct.pack("=HBBI", *ins) for ins in seccomp_program(_PID_MARK))
        if template.count(struct.pack("=I", _PID_MARK)) != 1:
            raise ValueError("the seccomp pid marker is not unique in the program")
        _SECCOMP[:] = [template, ctypes.c_char * len(template)]
    return _SECCOMP[0], _SECCOMP[1]


def install_seccomp(libc: ctypes.CDLL) -> None:
    """Installs `seccomp_program` for this process (needs ``no_new_privs`` or CAP_SYS_ADMIN)."""
    template, buffer_type = _seccomp_template()
    raw = template.replace(struct.pack("=I", _PID_MARK), struct.pack("=I", os.getpid()))
    buffer = buffer_type.from_buffer_copy(raw)
    fprog = _SockFprog(len(raw) // 8, ctypes.addressof(buffer))
    _check(libc.prctl(22, 2, ctypes.addressof(fprog), 0, 0), "prctl(PR_SET_SECCOMP)")  # SECCOMP_MODE_FILTER


# --- Landlock -----------------------------------------------------------------------------------------

_LL_CREATE, _LL_ADD_RULE, _LL_RESTRICT = 444, 445, 446
_LL_EXECUTE, _LL_WRITE_FILE, _LL_READ_FILE, _LL_READ_DIR = 1, 2, 4, 8
_LL_ABI1_ALL = (1 << 13) - 1  # EXECUTE .. MAKE_SYM
_LL_REFER, _LL_TRUNCATE = 1 << 13, 1 << 14
_LL_NET_TCP = 1 | 2  # BIND_TCP | CONNECT_TCP
_LL_SCOPE = 1 | 2  # ABSTRACT_UNIX_SOCKET | SIGNAL
_READ_ROOTS = ("/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/share/zoneinfo")
_READ_FILES = ("/etc/localtime", "/etc/ld.so.cache", "/dev/urandom", "/dev/random", "/dev/zero")


def landlock_abi(libc: ctypes.CDLL) -> int:
    """The kernel's Landlock ABI version, 0 when Landlock is absent or disabled."""
    version = libc.syscall(
        ctypes.c_long(_LL_CREATE), ctypes.c_void_p(None), ctypes.c_size_t(0), ctypes.c_uint(1)
    )
    return max(int(version), 0)


def _handled(abi: int) -> int:
    return _LL_ABI1_ALL | (_LL_REFER if abi >= 2 else 0) | (_LL_TRUNCATE if abi >= 3 else 0)


def prepare_landlock(abi: int, read_dirs: list[str]) -> list[tuple[int, bytes]]:
    """The fixed rules as (O_PATH fd, packed rule): reads below `read_dirs` + system libraries, /dev/null.

    Built once by the zygote; every child inherits the fds and adds its own work dir's rule.
    """
    file_rights = _LL_EXECUTE | _LL_WRITE_FILE | _LL_READ_FILE | (_LL_TRUNCATE if abi >= 3 else 0)
    rules = [(p, _LL_EXECUTE | _LL_READ_FILE | _LL_READ_DIR) for p in [*read_dirs, *_READ_ROOTS]]
    rules += [(p, _LL_READ_FILE) for p in _READ_FILES]
    rules.append(("/dev/null", _LL_READ_FILE | _LL_WRITE_FILE | (_LL_TRUNCATE if abi >= 3 else 0)))
    prepared = []
    for path, rights in rules:
        try:
            fd = os.open(path, os.O_PATH)
        except OSError:
            continue  # absent on this system
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            rights &= file_rights
        prepared.append((fd, struct.pack("=Qi", rights, fd)))
    return prepared


def install_landlock(libc: ctypes.CDLL, abi: int, workdir: str, prepared: list[tuple[int, bytes]]) -> None:
    """Allows writes only below `workdir`; reads only there and where the `prepared` rules allow."""
    fields = [_handled(abi)]
    if abi >= 4:
        fields.append(_LL_NET_TCP)
    if abi >= 6:
        fields.append(_LL_SCOPE)
    attr = struct.pack(f"={len(fields)}Q", *fields)
    ruleset = libc.syscall(ctypes.c_long(_LL_CREATE), attr, ctypes.c_size_t(len(attr)), ctypes.c_uint(0))
    _check(ruleset, "landlock_create_ruleset")
    own = os.open(workdir, os.O_PATH | os.O_CLOEXEC)
    try:
        for fd, rule in [(own, struct.pack("=Qi", _handled(abi), own)), *prepared]:
            if libc.syscall(_LL_ADD_RULE, ruleset, 1, rule, 0) < 0:  # the path is looked up only to report
                _check(-1, f"landlock_add_rule({os.readlink(f'/proc/self/fd/{fd}')})")
        _check(libc.syscall(_LL_RESTRICT, ruleset, 0), "landlock_restrict_self")
    finally:
        os.close(ruleset)
        os.close(own)
        for fd, _rule in prepared:
            os.close(fd)  # the child's copies: the code under test gets no O_PATH handles


# --- setup ----------------------------------------------------------------------------------------------


def _others_can_enter(path: str) -> bool:
    """Whether a uid with no rights of its own can list `path` (every ancestor has o+x, it has o+rx)."""
    path = os.path.realpath(path)
    parts = path.split("/")
    for i in range(2, len(parts) + 1):
        mode = os.stat("/".join(parts[:i]) or "/").st_mode
        need = stat.S_IXOTH | (stat.S_IROTH if i == len(parts) else 0)
        if mode & need != need:
            return False
    return True


def _keep_imports_reachable() -> list[str]:
    """Rewrites `sys.path` entries an unprivileged uid could not reach to ``/proc/self/fd/N``.

    A directory fd opened now (as root) stays usable after the uid drop: the kernel resolves the magic
    link without re-checking the parents (e.g. a Python under ``/root/.pyenv`` with ``/root`` 0700).
    Returns the real directories, for the Landlock read rules.
    """
    real_dirs, new_path, moved = [], [], {}
    for entry in sys.path:
        if not os.path.isdir(entry):
            continue
        real_dirs.append(os.path.realpath(entry))
        if _others_can_enter(entry):
            new_path.append(entry)
        else:
            fd = os.open(entry, os.O_PATH | os.O_DIRECTORY)
            new_path.append(f"/proc/self/fd/{fd}")
            moved[entry.rstrip("/") + "/"] = new_path[-1] + "/"
    sys.path[:] = new_path
    sys.path_importer_cache.clear()
    for module in list(sys.modules.values()):  # packages imported already (encodings, ctypes) too
        paths = getattr(module, "__path__", None)
        if isinstance(paths, list):
            for i, path in enumerate(paths):
                for old, new in moved.items():
                    if (path + "/").startswith(old):
                        paths[i] = new + path[len(old) :]
    return real_dirs


def _drop_privileges(uid: int) -> None:
    try:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    except OSError as exc:
        raise OSError(f"uid drop to {uid} failed: {exc}") from None
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (uid, uid, uid) or os.getgroups():
        raise OSError(f"uid drop to {uid} did not take")


def _set_limits(limits: dict[str, int]) -> None:
    table = {
        "cpu": resource.RLIMIT_CPU,
        "as": resource.RLIMIT_AS,
        "fsize": resource.RLIMIT_FSIZE,
        "nofile": resource.RLIMIT_NOFILE,
        "nproc": resource.RLIMIT_NPROC,
    }
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    for name, value in limits.items():
        hard = value + 1 if name == "cpu" else value  # SIGXCPU first, SIGKILL one second later
        resource.setrlimit(table[name], (value, hard))


# --- running ---------------------------------------------------------------------------------------------

_FILENAME = "<solution>"


# JSON text without importing `json` (whose imports cost more than the rest of this harness). Only plain
# values are encoded, through the base types' own methods, so subclasses cannot change what is sent.
_ESCAPES = {i: f"\\u{i:04x}" for i in [*range(32), *range(0xD800, 0xE000)]}
_ESCAPES.update({ord('"'): '\\"', ord("\\"): "\\\\"})
_FLOATS = {"inf": "Infinity", "-inf": "-Infinity", "nan": "NaN"}


def to_json(value: object, depth: int = 0) -> str:
    """JSON text of a plain value (None, bool, int, float, str, list, tuple, dict); TypeError otherwise."""
    if depth > 100:
        raise TypeError("nested more than 100 levels deep")
    if value is None or value is True or value is False:
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        text = float.__repr__(value)
        return _FLOATS.get(text, text)
    if isinstance(value, str):
        return '"' + str.translate(value, _ESCAPES) + '"'
    if isinstance(value, list | tuple):
        return "[" + ",".join([to_json(item, depth + 1) for item in value]) + "]"
    if isinstance(value, dict):
        items = []
        for key, item in dict.items(value):
            if not isinstance(key, str):
                if key is None or isinstance(key, bool | int | float):
                    key = to_json(key)  # as json.dumps does: 1 -> "1", True -> "true"
                else:
                    raise TypeError("dict keys must be strings")
            items.append(to_json(key) + ":" + to_json(item, depth + 1))
        return "{" + ",".join(items) + "}"
    raise TypeError(f"{type(value).__name__} is not a JSON value")


class _Emitter:
    def __init__(self, fd: int):
        self.fd = fd

    def __call__(self, **record: object) -> None:
        data = (to_json(record) + "\n").encode("utf-8", errors="replace")
        while data:
            data = data[os.write(self.fd, data) :]


def _describe(exc: BaseException) -> dict[str, object]:
    """Kind, one-line text and line number of an exception from the untrusted code."""
    if isinstance(exc, SystemExit):
        return {"kind": "exit", "error": f"SystemExit({exc.code!r:.100})", "code": _exit_code(exc)}
    try:
        message = str(exc)
    except BaseException:
        message = "<unprintable message>"
    line = None
    if isinstance(exc, SyntaxError) and exc.filename == _FILENAME:
        line, message = exc.lineno, exc.msg
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == _FILENAME:
            line = tb.tb_lineno
        tb = tb.tb_next
    name = type(exc).__name__
    text = f"{name}: {message}" if message else name
    kind = "memory" if isinstance(exc, MemoryError) else "error"
    return {"kind": kind, "error": text[:4000], "line": line}


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    return exc.code if isinstance(exc.code, int) else 1


def _stdin_fd(data: str, name: str, workdir_fd: int) -> int:
    """A read fd on a new file `name` in the work dir holding `data` (by dir fd: the path may be unreachable)."""
    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600, dir_fd=workdir_fd)
    payload = data.encode("utf-8", errors="replace")
    while payload:
        payload = payload[os.write(fd, payload) :]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _run_stdio(code: object, stdin: str, workdir_fd: int, index: int, cap: int) -> dict[str, object]:
    """Runs the program as ``__main__`` with `stdin` on fd 0 and fd 1 captured to a file."""
    _flush_std()  # what earlier code printed belongs to the real stdout
    saved_out = os.dup(1)
    in_fd = _stdin_fd(stdin, f".stdin-{index}", workdir_fd)
    out_fd = os.open(f".stdout-{index}", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600, dir_fd=workdir_fd)
    os.dup2(in_fd, 0)
    os.dup2(out_fd, 1)
    os.close(in_fd)
    sys.stdin = open(0, encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
    sys.stdout = open(1, "w", encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
    outcome: dict[str, object] = {"ok": True}
    try:
        exec(code, {"__name__": "__main__", "__builtins__": builtins})
    except BaseException as exc:
        described = _describe(exc)
        if described["kind"] != "exit" or described.get("code") != 0:
            outcome = {"ok": False, **described}
    try:
        sys.stdout.flush()
    except BaseException:
        pass
    os.dup2(saved_out, 1)
    os.close(saved_out)
    sys.stdout = open(1, "w", encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
    outcome["value"] = os.pread(out_fd, cap, 0).decode("utf-8", errors="replace")
    os.close(out_fd)
    return outcome


def _run_checks(job: dict, emit: _Emitter, code: object, workdir_fd: int) -> None:
    cap = job["max_value_bytes"]
    namespace: dict[str, object] | None = None
    for index, check in enumerate(job["checks"]):
        if "function" in check and namespace is None:
            namespace = {"__name__": "solution", "__builtins__": builtins}
            try:
                exec(code, namespace)
            except BaseException as exc:
                emit(ev="load", ok=False, **_describe(exc))
                return
            emit(ev="load", ok=True)
        emit(ev="start", i=index)
        if "function" not in check:
            emit(ev="done", i=index, **_run_stdio(code, check["stdin"], workdir_fd, index, cap))
            continue
        function = namespace.get(check["function"]) if namespace is not None else None
        if not callable(function):
            emit(ev="done", i=index, ok=False, kind="missing", error=f"no function named {check['function']}")
            continue
        try:
            args, kwargs = marshal.loads(check["args"]), marshal.loads(check["kwargs"])  # fresh copies
            value = function(*args, **kwargs)
        except BaseException as exc:
            emit(ev="done", i=index, ok=False, **_describe(exc))
            continue
        try:
            text = to_json(value)
        except TypeError as exc:  # a value that is not plain JSON: say which part (our own messages)
            kind, detail = type(value).__name__[:100], str(exc)[:200]
            error = f"returned a {kind} object, not a JSON value"
            emit(
                ev="done",
                i=index,
                ok=False,
                kind="type",
                error=error + ("" if detail.startswith(f"{kind} is not") else f" ({detail})"),
            )
            continue
        except MemoryError:
            emit(
                ev="done",
                i=index,
                ok=False,
                kind="error",
                error="return value too large to send (out of memory)",
            )
            continue
        except BaseException as exc:  # e.g. an int beyond Python's digit limit for str()
            detail = f"{type(exc).__name__}: {str(exc)[:200]}"
            emit(ev="done", i=index, ok=False, kind="error", error=f"return value cannot be sent: {detail}")
            continue
        if len(text) > cap:
            emit(ev="done", i=index, ok=False, kind="error", error=f"return value larger than {cap} bytes")
            continue
        emit(ev="done", i=index, ok=True, value_json=text)


def _run_script(job: dict, emit: _Emitter, code: object, workdir_fd: int) -> None:
    if job["stdin"]:  # else fd 0 stays /dev/null
        fd = _stdin_fd(job["stdin"], ".stdin", workdir_fd)
        os.dup2(fd, 0)
        os.close(fd)
    sys.stdin = open(0, encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
    try:
        exec(code, {"__name__": "__main__", "__builtins__": builtins})
    except BaseException as exc:
        described = _describe(exc)
        emit(ev="exit", ok=described.get("code") == 0, **described)
        return
    emit(ev="exit", ok=True, code=0)


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except BaseException:
            pass


def _confine_and_run(workdir: str, disk: str) -> None:
    """Reads the job from stdin, confines this process, runs the code, reports, and `os._exit`s."""
    chunks = []
    while chunk := os.read(0, 1 << 16):
        chunks.append(chunk)
    job = marshal.loads(b"".join(chunks))
    emit = _Emitter(_RESULT_FD)
    ready: dict[str, object] = {"uid": None, "seccomp": False, "landlock": 0, "disk": disk, "notes": []}
    try:
        os.chdir(workdir)
        workdir_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        libc = _libc()
        _check(libc.prctl(38, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
        # Landlock and seccomp are best effort (the parent reports a weaker level); the uid drop is not:
        # a child that was asked to drop root and could not must never run the code.
        if job["landlock"]:
            abi = _LANDLOCK[0] if _LANDLOCK else 0
            try:
                if abi:
                    install_landlock(libc, abi, workdir, _LANDLOCK[1])
                    ready["landlock"] = abi
                else:
                    ready["notes"].append("Landlock is not available in this kernel")
            except OSError as exc:
                ready["notes"].append(f"Landlock failed: {exc}")
        for fd, _rule in _LANDLOCK[1] if _LANDLOCK and not ready["landlock"] else ():
            os.close(fd)  # unused here: the code under test gets no O_PATH handles
        if job["uid"] is not None:
            _drop_privileges(job["uid"])
            ready["uid"] = job["uid"]
        if job["seccomp"]:
            try:
                install_seccomp(libc)
                ready["seccomp"] = True
            except OSError as exc:
                ready["notes"].append(f"seccomp failed: {exc}")
        _set_limits(job["limits"])
    except BaseException as exc:
        emit(ev="fatal", error=f"sandbox setup failed: {type(exc).__name__}: {exc}")
        os._exit(3)
    emit(ev="ready", **ready)
    sys.argv = ["solution"]
    try:
        code = compile(job["code"], _FILENAME, "exec", dont_inherit=True)
    except BaseException as exc:  # SyntaxError, ValueError (null bytes), MemoryError, RecursionError
        emit(ev="load", ok=False, **_describe(exc))
        emit(ev="end")
        os._exit(0)
    del job["code"]
    if job["mode"] == "script":
        _run_script(job, emit, code, workdir_fd)
    else:
        _run_checks(job, emit, code, workdir_fd)
    _flush_std()
    emit(ev="end")
    os._exit(0)  # also ends threads the untrusted code left running


# --- the zygote ------------------------------------------------------------------------------------------
#
# One zygote serves one worker slot. It runs as the trainer's user (root for the uid layer), never runs
# untrusted code. It keeps a base directory (a tmpfs in its own mount namespace where it may mount one,
# resized to each run's quota; else a plain directory whose runs it measures) and for each run: creates
# the work directory below it, forks a child that
# confines itself and runs the job, reports the child's exit status and disk use, and after the parent
# has killed the run's process group, reaps every descendant (it is their subreaper) and removes the
# work directory. Messages on the SOCK_SEQPACKET control socket (one datagram each):
#   parent -> zygote: R<marshal: uid, quota_bytes, quota_files> with the child's stdin, stdout, stderr
#                     and result fds attached; C (clean up the last run); empty (EOF): exit.
#   zygote -> parent: Z<json: ready>, P<pid><workdir>, X<json: exit status and disk use>, D<left: 0/1>.

_RESULT_FD = 3
_LANDLOCK: list = []  # [abi, prepared rules], set by the zygote
_CLONE_NEWNS, _MS_REC, _MS_PRIVATE, _MNT_DETACH = 0x00020000, 0x4000, 1 << 18, 2
_MS_NOSUID, _MS_NODEV, _MS_REMOUNT = 2, 4, 32
_EXITED_NOWAIT = os.WEXITED | os.WNOWAIT
_POLL_S = 0.01  # disk measuring interval where no tmpfs limits it
# Inodes a finished run may still pin for a moment (its Landlock domain holds its work dir until freed).
_INODE_SLACK = 8


def _private_mounts(libc: ctypes.CDLL) -> str | None:
    """Moves this process to its own mount namespace (mounts made here stay invisible outside)."""
    if libc.unshare(_CLONE_NEWNS) != 0:
        return f"no private mount namespace ({os.strerror(ctypes.get_errno())})"
    if libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
        return f"mounts cannot be made private ({os.strerror(ctypes.get_errno())})"
    return None


def _usage(path: str) -> tuple[int, int]:
    """(bytes on disk, entries) below `path`, never following symlinks."""
    used, entries, stack = 0, 0, [path]
    while stack:
        try:
            with os.scandir(stack.pop()) as found:
                for entry in found:
                    entries += 1
                    info = entry.stat(follow_symlinks=False)
                    used += info.st_blocks * 512
                    if stat.S_ISDIR(info.st_mode):
                        stack.append(entry.path)
        except OSError:
            continue
    return used, entries


def _over_quota(workdir: str, tmpfs: bool, quota_bytes: int, quota_files: int) -> tuple[int, int, str]:
    """(bytes, files, what was exceeded or "") of the run's work dir."""
    if tmpfs:  # the kernel refuses the write past the quota. Reaching a quota counts as exceeding it.
        info = os.statvfs(workdir)
        used = (info.f_blocks - info.f_bfree) * info.f_frsize
        files = info.f_files - info.f_ffree - 2  # the tmpfs root and the work dir
        over_files = info.f_ffree == 0 or files >= quota_files
        over_bytes = info.f_bfree == 0 or used >= quota_bytes
    else:
        used, files = _usage(workdir)
        over_files, over_bytes = files >= quota_files, used >= quota_bytes
    if over_files:
        return used, files, f"the work dir reached its limit of {quota_files} files"
    if over_bytes:
        return used, files, f"the work dir reached its limit of {quota_bytes >> 20} MB ({used} bytes written)"
    return used, files, ""


def _fork_child(fds: list[int], workdir: str, disk: str, keep: set[int]) -> int:
    pid = os.fork()
    if pid:
        return pid
    try:
        os.setsid()
        gc.enable()
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in fds]
        for target, fd in enumerate(high):
            os.dup2(fd, target)
        low = _RESULT_FD + 1
        for fd in sorted(keep):
            os.closerange(low, fd)
            low = fd + 1
        os.closerange(low, 1 << 20)
        os.environ["HOME"] = os.environ["TMPDIR"] = workdir
        _confine_and_run(workdir, disk)
    finally:
        os._exit(3)


def _reap(deadline: float) -> bool:
    """Reaps every dead descendant; kills live ones (the run is over). True if some are left."""
    while True:
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            return False
        try:
            with open(f"/proc/self/task/{os.getpid()}/children") as handle:
                for pid in handle.read().split():
                    os.kill(int(pid), 9)
        except OSError:
            pass
        if time.monotonic() > deadline:
            return True
        time.sleep(0.001)


def _serve_run(sock, params: dict, fds: list[int], base: str, tmpfs: bool, keep: set[int], libc) -> None:
    uid, quota_bytes, quota_files = params["uid"], params["quota_bytes"], params["quota_files"]
    workdir = os.path.join(base, "run-" + os.urandom(8).hex())
    try:
        if tmpfs:  # this run's quota (the tmpfs is empty between runs)
            options = f"size={quota_bytes},nr_inodes={quota_files + 2 + _INODE_SLACK}".encode()
            if libc.mount(None, base.encode(), None, _MS_REMOUNT | _MS_NOSUID | _MS_NODEV, options) != 0:
                raise OSError(f"tmpfs remount of {base} failed: {os.strerror(ctypes.get_errno())}")
        os.mkdir(workdir, 0o700)
        if uid is not None:
            os.chown(workdir, uid, uid)
        pid = _fork_child(fds, workdir, "tmpfs" if tmpfs else "watched", keep)
    except OSError as exc:
        shutil.rmtree(workdir, ignore_errors=True)
        sock.send(b"E" + f"{type(exc).__name__}: {exc}".encode())
        return
    finally:
        for fd in fds:
            os.close(fd)
    sock.send(b"P" + struct.pack("=i", pid) + workdir.encode())
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:  # Linux < 5.3: poll
        pidfd = None
    watch = [sock] if pidfd is None else [pidfd, sock]
    exceeded, parent_gone = "", False
    try:
        while True:
            ready = select.select(watch, [], [], None if tmpfs and pidfd is not None else _POLL_S)[0]
            if pidfd in ready or (pidfd is None and os.waitid(os.P_PID, pid, _EXITED_NOWAIT | os.WNOHANG)):
                break
            if sock in ready:  # the parent closed the socket (it is gone): end the run and leave
                _killpg(pid)
                parent_gone = True
            elif not exceeded and (exceeded := _over_quota(workdir, tmpfs, quota_bytes, quota_files)[2]):
                _killpg(pid)  # measured over the quota: end the run now
    finally:
        if pidfd is not None:
            os.close(pidfd)
    if not parent_gone:
        info = os.waitid(os.P_PID, pid, _EXITED_NOWAIT)  # unreaped: the pid (group) stays reserved
        used, files, over = _over_quota(workdir, tmpfs, quota_bytes, quota_files)
        rc = info.si_status if info.si_code == 1 else -info.si_status  # CLD_EXITED = 1, else a signal
        sock.send(
            b"X" + to_json({"rc": rc, "bytes": used, "files": files, "quota": exceeded or over}).encode()
        )
        parent_gone = sock.recv(16) != b"C"  # the parent kills the process group first
    if parent_gone:
        _killpg(pid)
    left = _reap(time.monotonic() + 0.1)
    shutil.rmtree(workdir, ignore_errors=True)  # fd-based: never follows the code's symlinks
    if parent_gone:
        _leave(base, tmpfs, libc)
    sock.send(b"D" + bytes([left]))


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, 9)
    except OSError:
        pass


def _leave(base: str, tmpfs: bool, libc: ctypes.CDLL) -> None:
    """Removes the zygote's base directory (unmounting its tmpfs) and exits."""
    if tmpfs:
        libc.umount2(base.encode(), _MNT_DETACH)
    shutil.rmtree(base, ignore_errors=True)
    os._exit(0)


def _warm_up() -> None:
    """Runs once in the zygote what every child would otherwise initialise for itself after the fork:
    CPython builds its compiler's AST types on the first `compile` (~1 ms, half of a run's CPU), and the
    JSON encoder's first record touches its tables."""
    exec(compile("x = 1", "<warm-up>", "exec", dont_inherit=True), {"__builtins__": builtins})
    to_json({"ev": "ready", "ok": True, "n": 1, "x": 0.5, "notes": ["a"], "error": None})


def zygote(control: int, tmp_dir: str, want_tmpfs: bool) -> None:
    """Serves runs on the control socket until the parent closes it (or dies)."""
    libc = _libc()
    _check(libc.prctl(36, 1, 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)")  # orphans of a run come back here
    moved = fcntl.fcntl(control, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(control)
    os.dup2(os.open("/dev/null", os.O_RDWR), _RESULT_FD)  # fds 0-3 stay free of what must outlive a fork
    sock = socket.socket(fileno=moved)
    notes = []
    tmpfs = False
    if want_tmpfs:
        why = _private_mounts(libc)
        tmpfs = why is None
        if why:
            notes.append(f"disk quota watched, not a tmpfs: {why}")
    keep = set()
    if os.geteuid() == 0:
        read_dirs = _keep_imports_reachable()
        keep = {int(p.rsplit("/", 1)[1]) for p in sys.path if p.startswith("/proc/self/fd/")}
    else:
        read_dirs = [os.path.realpath(p) for p in sys.path if os.path.isdir(p)]
    read_dirs.append(os.path.dirname(os.path.realpath(os.__file__)))
    abi = landlock_abi(libc)
    if abi:
        _LANDLOCK[:] = [abi, prepare_landlock(abi, read_dirs)]
        keep |= {fd for fd, _rule in _LANDLOCK[1]}
    _libc()
    _seccomp_template()
    _warm_up()
    gc.collect()
    gc.freeze()  # the zygote's objects stay out of every child's collections: fewer copied pages
    gc.disable()  # and the zygote (whose loop makes no cycles) never walks them either; children re-enable
    base = os.path.join(tmp_dir, "sdpo-sandbox-" + os.urandom(8).hex())
    os.mkdir(base, 0o711)  # runs' work dirs go below, each owned by its run's uid
    if tmpfs and libc.mount(b"tmpfs", base.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, b"size=1m,mode=0711"):
        tmpfs = False
        notes.append(f"disk quota watched, not a tmpfs: mount failed ({os.strerror(ctypes.get_errno())})")
    sock.send(b"Z" + to_json({"tmpfs": tmpfs, "notes": notes, "base": base}).encode())
    while True:
        message, fds, _flags, _addr = socket.recv_fds(sock, 1 << 12, 4)
        if not message:
            _leave(base, tmpfs, libc)
        if message[:1] == b"R" and len(fds) == 4:
            _serve_run(sock, marshal.loads(message[1:]), fds, base, tmpfs, keep, libc)
        else:
            for fd in fds:
                os.close(fd)


if __name__ == "__main__":
    zygote(int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1")
