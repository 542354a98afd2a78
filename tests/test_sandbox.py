"""The sandbox, attack by attack.

Each row of `ATTACKS` runs hostile code and asserts: the result says what happened, the trainer (this
process) survives, nothing outside the work directory changed (canary files in a temp directory this
test creates, never the real home), the work directory is gone, and no process of the slot's uid is
left. Rows that depend on a confinement layer the machine lacks are skipped with the reason; the fork
bomb and ``kill(-1)`` rows only run where the child really drops to an unprivileged uid.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import warnings
from dataclasses import dataclass, field
from typing import Any

import pytest

import sdpo_unsloth
from sdpo_unsloth.sandbox import (
    Check,
    Isolation,
    IsolationLevel,
    Job,
    Limits,
    Sandbox,
    SandboxError,
    SandboxResult,
    Status,
    outputs_equal,
    values_equal,
)
from sdpo_unsloth.sandbox import child as sandbox_child
from sdpo_unsloth.sandbox import slots as sandbox_slots

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox is Linux only")

SECRET = "hf_canary_7f3a9d0c2b"


# --- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def canary():
    """A world-traversable temp dir of files the attacks go after.

    ``keep.txt`` sits in a root-owned 0755 dir (a separate uid cannot touch it); ``open/victim.txt`` sits
    in a 0777 dir with mode 0666 (only Landlock protects it from a separate uid).
    """
    root = tempfile.mkdtemp(prefix="sdpo-canary-", dir="/tmp")
    os.chmod(root, 0o755)
    with open(os.path.join(root, "keep.txt"), "w") as handle:
        handle.write(SECRET)
    os.chmod(os.path.join(root, "keep.txt"), 0o644)
    os.mkdir(os.path.join(root, "open"))
    os.chmod(os.path.join(root, "open"), 0o777)
    with open(os.path.join(root, "open", "victim.txt"), "w") as handle:
        handle.write("victim")
    os.chmod(os.path.join(root, "open", "victim.txt"), 0o666)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def work_root():
    root = tempfile.mkdtemp(prefix="sdpo-work-", dir="/tmp")
    os.chmod(root, 0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def own_root():
    """A work root no other sandbox of this module uses (to check it is empty once the sandbox closed)."""
    root = tempfile.mkdtemp(prefix="sdpo-work-", dir="/tmp")
    os.chmod(root, 0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def sandbox(work_root):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a weaker machine warns once; rows skip instead
        box = Sandbox(workers=2, limits=Limits(timeout_s=1.0, memory_mb=256), tmp_dir=work_root)
        box.isolation  # noqa: B018 - probe once
    yield box
    box.close()


def _files_below(root: str) -> list[str]:
    """What is below `root` but directories (a live zygote keeps an empty base directory there)."""
    return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files]


def _snapshot(root: str) -> dict[str, tuple]:
    found = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            digest = ""
            if stat.S_ISREG(info.st_mode):
                with open(path, "rb") as handle:
                    digest = hashlib.sha256(handle.read()).hexdigest()
            found[os.path.relpath(path, root)] = (info.st_mode, info.st_uid, info.st_size, digest)
    return found


def _protects_files(iso: Isolation) -> str | None:
    """Skip reason unless another uid or Landlock keeps the child away from the trainer's files."""
    if iso.uid is None and not iso.landlock_abi:
        return "the child runs as this user without Landlock: it may change this user's files (reported)"
    return None


def _needs(layer: str, iso: Isolation) -> str | None:
    if layer == "uid" and iso.uid is None:
        return "no unprivileged uid here (not root): fork bombs and kill(-1) must not run as this user"
    if layer == "seccomp" and not iso.seccomp:
        return "no seccomp on this machine (reported as weaker isolation)"
    if layer == "landlock" and not iso.landlock_abi:
        return "no Landlock on this machine (reported as weaker isolation)"
    if layer == "files":
        return _protects_files(iso)
    return None


def _guarded_run(
    box: Sandbox, canary: str, work_root: str, code: str, checks=(), limits=None
) -> SandboxResult:
    """Runs `code` and asserts the aftermath: trainer alive, canaries intact, no work dir, no processes."""
    iso = box.isolation

    def watched() -> dict[str, tuple]:
        # What this machine's layers promise to keep: all of it with Landlock; with only a separate uid,
        # all but the 0777 "open" dir; with neither, nothing (the rows that touch files skip there).
        if iso.landlock_abi:
            return _snapshot(canary)
        if iso.uid is not None:
            return {k: v for k, v in _snapshot(canary).items() if not k.startswith("open")}
        return {}

    before = watched()
    result = box.run(code, checks, limits=limits)
    os.kill(os.getpid(), 0)  # still here
    assert watched() == before, "a file outside the work directory changed"
    assert _files_below(work_root) == [], "the work directory was not removed"
    for slot in box._slots._all:
        if slot.uid is not None:
            assert sandbox_slots.processes_of(slot.uid) == [], f"processes of uid {slot.uid} survived"
    return result


# --- the attack table -------------------------------------------------------------------------------------


@dataclass
class Attack:
    id: str
    code: str  # formatted with canary=<canary dir>
    statuses: set[Status]  # acceptable result statuses
    says: str = ""  # must appear in result.error + stdout
    needs: tuple[str, ...] = ()
    checks: tuple[Check, ...] = ()
    limits: dict[str, Any] = field(default_factory=dict)
    also: Any = None  # extra assertion: f(result, canary)


def _no_leak(result: SandboxResult, canary: str) -> None:
    for text in (result.stdout, result.stderr, result.error):
        assert SECRET not in text


def _attempts_denied(result: SandboxResult, canary: str) -> None:
    lines = result.stdout.splitlines()
    assert lines and all(line.startswith("denied") for line in lines), result.stdout


def _short(result: SandboxResult, canary: str) -> None:
    assert result.elapsed_s < 8, "the run waited for a process or thread the untrusted code left behind"


ATTACKS = [
    Attack(
        "infinite_loop", "while True:\n    pass", {Status.TIMEOUT}, "timed out", limits={"timeout_s": 0.5}
    ),
    Attack(
        "infinite_loop_in_test",
        "def f(x):\n    while True:\n        pass",
        {Status.TIMEOUT},
        "timed out",
        checks=(Check("f", (1,), expected=1), Check("f", (2,), expected=2)),
        limits={"timeout_s": 0.5},
        also=lambda r, c: (
            [x.status for x in r.checks] == [Status.TIMEOUT, Status.NOT_RUN] or pytest.fail(str(r))
        ),
    ),
    Attack("memory_bomb", "x = bytearray(10 ** 10)", {Status.MEMORY}, "MemoryError"),
    Attack(
        "memory_growth",
        "chunks = []\nwhile True:\n    chunks.append(bytearray(10 ** 7))",
        {Status.MEMORY, Status.KILLED},
        # the memory limit, not the clock, must stop it: on a loaded machine the child's start alone can take 1 s
        limits={"timeout_s": 10.0},
    ),
    Attack(
        "fork_bomb",
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        {Status.TIMEOUT},
        needs=("uid",),
        limits={"timeout_s": 0.5},
    ),
    Attack(
        "rm_rf_home",
        "import os\nprint(os.system('rm -rf ~'), os.system('rm -rf {canary}'))",
        {Status.OK, Status.ERROR},
        needs=("files",),
    ),
    Attack(
        "delete_and_overwrite_outside",
        textwrap.dedent("""\
            import os, shutil
            attempts = [
                lambda: os.remove('{canary}/keep.txt'),
                lambda: os.remove('{canary}/open/victim.txt'),
                lambda: open('{canary}/open/victim.txt', 'w').write('pwned'),
                lambda: os.rename('{canary}/open/victim.txt', '{canary}/open/moved'),
                lambda: os.mkdir('{canary}/open/new'),
                lambda: os.symlink('/etc/passwd', '{canary}/open/link'),
                lambda: os.chmod('{canary}/keep.txt', 0o777),
                lambda: shutil.rmtree('{canary}'),
            ]
            for attempt in attempts:
                try:
                    attempt()
                    print('done')
                except OSError as exc:
                    print('denied', type(exc).__name__)
            """),
        {Status.OK},
        needs=("landlock",),
        also=_attempts_denied,
    ),
    Attack(
        "huge_file",
        "with open('big.bin', 'wb') as f:\n    f.write(b'x' * (64 << 20))",
        {Status.ERROR},
        "File too large",
    ),
    Attack(
        "environment_secrets",
        "import os\nprint(sorted(os.environ))\nprint(os.environ.get('HF_TOKEN'), os.environ.get('WANDB_API_KEY'))",
        {Status.OK},
        "None None",
        also=lambda r, c: (
            json.loads(r.stdout.splitlines()[0].replace("'", '"'))
            == ["HOME", "LANG", "LC_ALL", "PATH", "TMPDIR"]
            or pytest.fail(r.stdout)
        ),
    ),
    Attack(
        "read_files_outside",
        textwrap.dedent("""\
            for path in ['{canary}/keep.txt', '/etc/shadow', '/root/.bashrc']:
                try:
                    print(open(path).read())
                except OSError as exc:
                    print('denied', type(exc).__name__)
            """),
        {Status.OK},
        needs=("landlock",),
        also=_no_leak,
    ),
    Attack(
        "exit_before_tests",
        "import sys\nsys.exit(0)\ndef f(x):\n    return x",
        {Status.ERROR},
        "sys.exit",
        checks=(Check("f", (1,), expected=1),),
        also=lambda r, c: (r.before_tests and r.passed == 0) or pytest.fail(str(r)),
    ),
    Attack("kill_parent", "import os\nos.kill(os.getppid(), 9)", {Status.ERROR}, "PermissionError"),
    Attack("kill_everything", "import os\nos.kill(-1, 9)", {Status.ERROR, Status.OK}, needs=("uid",)),
    Attack(
        "print_megabytes",
        "import sys\nfor _ in range(64):\n    sys.stdout.write('x' * (1 << 20))",
        {Status.OK},
        also=lambda r, c: (
            (r.truncated and len(r.stdout) <= Limits().max_output_bytes) or pytest.fail("no cap")
        ),
    ),
    Attack(
        "non_utf8_output",
        "import sys\nsys.stdout.buffer.write(b'ok \\xff\\xfe\\x80 end')",
        {Status.OK},
        "ok \ufffd\ufffd\ufffd end",
    ),
    Attack("deep_recursion", "def f(n):\n    return f(n + 1)\nf(0)", {Status.ERROR}, "RecursionError"),
    Attack(
        "unbounded_recursion",
        "import sys\nsys.setrecursionlimit(10 ** 9)\ndef f(n):\n    return f(n + 1)\nf(0)",
        {Status.TIMEOUT, Status.MEMORY, Status.KILLED, Status.ERROR},
        limits={"timeout_s": 0.5},
    ),
    Attack("segfault", "import ctypes\nctypes.string_at(0)", {Status.KILLED}, "SIGSEGV"),
    Attack(
        "change_cwd",
        textwrap.dedent("""\
            import os
            os.chdir('{canary}/open')
            try:
                open('planted.txt', 'w').write('x')
                print('planted')
            except OSError:
                print('denied')
            def f(x):
                return x + 1
            """),
        {Status.OK},
        "denied",
        needs=("landlock",),
        checks=(Check("f", (1,), expected=2), Check(stdin="", expected="denied")),
    ),
    Attack(
        "setsid_daemon",
        "import os, time\npid = os.fork()\nif pid == 0:\n    try:\n        os.setsid()\n    except OSError:\n"
        "        pass\n    time.sleep(60)\nprint(pid)",
        {Status.OK},
        also=_short,
    ),
    Attack(
        "thread_never_exits",
        "import threading, time\nthreading.Thread(target=time.sleep, args=(60,)).start()\nprint('main done')",
        {Status.OK},
        "main done",
        also=_short,
    ),
    Attack(
        "run_a_program",
        "import subprocess\nsubprocess.run(['/bin/echo', 'hi'])",
        {Status.ERROR},
        "PermissionError",
        needs=("seccomp",),
    ),
    Attack(
        "trace_the_parent",
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "print(libc.ptrace(16, os.getppid(), 0, 0), ctypes.get_errno())",
        {Status.OK},
        "-1 1",  # PTRACE_ATTACH refused with EPERM
        needs=("seccomp",),
    ),
    Attack(
        "escape_via_namespaces",
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nprint(libc.unshare(0x10000000), ctypes.get_errno())",
        {Status.OK},
        "-1 1",
        needs=("seccomp",),
    ),
]


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.id for a in ATTACKS])
def test_attack_is_contained(attack: Attack, sandbox: Sandbox, canary: str, work_root: str):
    for layer in attack.needs:
        if reason := _needs(layer, sandbox.isolation):
            pytest.skip(reason)
    limits = Limits(**{"timeout_s": 1.0, "memory_mb": 256, **attack.limits})
    code = attack.code.replace("{canary}", canary)
    result = _guarded_run(sandbox, canary, work_root, code, attack.checks, limits)
    assert result.status in attack.statuses, result
    assert attack.says in result.error + result.stdout, result
    _no_leak(result, canary)
    if attack.also is not None:
        attack.also(result, canary)


def test_secrets_of_the_parent_process_stay_out_of_reach(work_root: str):
    """A parent whose own exec environment holds HF_TOKEN: the child cannot read it, not even via /proc."""
    steal = textwrap.dedent("""\
        import os
        ppid = os.getppid()
        print(ppid, os.environ.get('HF_TOKEN'))
        for path in [f'/proc/{ppid}/environ', f'/proc/{ppid}/cmdline', '/proc/1/environ', '/proc/self/environ']:
            try:
                print(open(path, 'rb').read())
            except OSError as exc:
                print('denied', path, type(exc).__name__)
        try:
            maps = open(f'/proc/{ppid}/maps').read().splitlines()
            mem = open(f'/proc/{ppid}/mem', 'rb')
            for line in maps:
                start, end = (int(x, 16) for x in line.split()[0].split('-'))
                mem.seek(start)
                print(mem.read(min(end - start, 1 << 20)))
        except (OSError, ValueError) as exc:
            print('denied mem', type(exc).__name__)
        """)
    parent = textwrap.dedent(f"""\
        import json, os, warnings
        warnings.simplefilter('ignore')
        from sdpo_unsloth.sandbox import Sandbox
        assert {SECRET!r}.encode() in open('/proc/self/environ', 'rb').read()  # the secret is really there
        result = Sandbox(workers=1, tmp_dir={work_root!r}).run({steal!r})
        print(json.dumps({{'out': result.stdout, 'err': result.stderr, 'error': result.error,
                          'uid': result.isolation.uid, 'landlock': result.isolation.landlock_abi}}))
        """)
    env = {**os.environ, "HF_TOKEN": SECRET, "WANDB_API_KEY": SECRET, "AWS_SECRET_ACCESS_KEY": SECRET}
    done = subprocess.run(
        [sys.executable, "-c", parent], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    if report["uid"] is None and not report["landlock"]:
        pytest.skip("same uid and no Landlock: /proc/<ppid>/environ is readable here (reported as minimal)")
    assert SECRET not in report["out"] + report["err"] + report["error"]
    ppid = report["out"].split()[0]
    assert f"denied /proc/{ppid}/environ" in report["out"] and "denied mem" in report["out"]


def test_network_is_blocked_or_reported(sandbox: Sandbox, canary: str, work_root: str):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.3)
    port = listener.getsockname()[1]
    code = textwrap.dedent(f"""\
        import socket
        try:
            socket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'leak')
            print('connected')
        except OSError as exc:
            print('blocked', type(exc).__name__)
        try:
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'leak', ('127.0.0.1', {port}))
            print('sent')
        except OSError as exc:
            print('blocked', type(exc).__name__)
        """)
    try:
        result = _guarded_run(sandbox, canary, work_root, code)
        if not result.isolation.network_blocked:
            assert "seccomp" in result.isolation.description  # the gap is named in the result
            pytest.skip("this machine cannot block sockets (no seccomp); the result reports it")
        assert result.stdout.split() == ["blocked", "PermissionError", "blocked", "PermissionError"]
        with pytest.raises(TimeoutError):
            listener.accept()
    finally:
        listener.close()


def test_a_fork_bomb_leaves_the_slot_clean_for_the_next_run(work_root: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        box = Sandbox(workers=1, limits=Limits(timeout_s=0.5), tmp_dir=work_root)
    with box:
        if reason := _needs("uid", box.isolation):
            pytest.skip(reason)
        bomb = box.run(
            "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
        )
        assert bomb.status is Status.TIMEOUT
        after = box.run("import os\nprint(os.fork() > 0 or os._exit(0))")  # forking works again at once
        assert after.status is Status.OK and after.stdout == "True\n", after
        # The bomb's uid is reused only once its zombies are gone; meanwhile the slot ran on another one.
        assert after.isolation.uid != bomb.isolation.uid or not sandbox_slots.processes_of(
            bomb.isolation.uid, zombies=True
        )


# --- the zygote: fresh state per run, never runs untrusted code -------------------------------------------


def test_every_run_is_a_fresh_fork_of_an_untouched_zygote(sandbox: Sandbox):
    """A run that poisons its interpreter (modules, builtins, environment, cwd) leaves nothing to the next."""
    poison = textwrap.dedent("""\
        import builtins, os, sys
        sys.modules['json'] = 'poisoned'
        builtins.len = lambda x: -1
        os.environ['POISON'] = '1'
        sys.path.insert(0, '/nowhere')
        print(os.getpid(), os.getppid())
        """)
    probe = textwrap.dedent("""\
        import builtins, os, sys
        print(os.getpid(), os.getppid(), type(sys.modules.get('json')).__name__, len([1, 2]),
              os.environ.get('POISON'), '/nowhere' in sys.path)
        import stat
        kinds = set()
        for fd in range(4, 1024):
            try:
                kinds.add('socket' if stat.S_ISSOCK(os.fstat(fd).st_mode) else 'other')
            except OSError:
                pass
        print(sorted(kinds))
        """)
    first = sandbox.run(poison)
    pids = set()
    for _ in range(3):
        result = sandbox.run(probe)
        assert result.status is Status.OK, result
        line, fds = result.stdout.splitlines()
        pid, ppid, json_type, length, env, path = line.split()
        assert (json_type, length, env, path) in {
            ("NoneType", "2", "None", "False"),
            ("module", "2", "None", "False"),
        }
        assert "socket" not in fds  # the zygote's control socket never reaches the untrusted code
        pids.add(pid)
    assert len(pids) == 3 and first.stdout.split()[0] not in pids
    zygotes = {s.zygote.proc.pid for s in sandbox._slots._all if s.zygote is not None}
    assert int(ppid) in zygotes and int(ppid) != os.getpid()  # forked by a zygote, not by the trainer
    if sandbox.isolation.uid is not None:
        for pid in zygotes:  # the zygotes stay root: they never dropped to run code themselves
            with open(f"/proc/{pid}/status") as handle:
                assert "\nUid:\t0\t0\t0\t0" in handle.read()


def test_a_dead_zygote_is_replaced(own_root: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        box = Sandbox(workers=1, tmp_dir=own_root)
    with box:
        first = box.run("import os\nprint(os.getppid())")
        box._slots._all[0].zygote.proc.kill()
        box._slots._all[0].zygote.proc.wait()
        second = box.run("import os\nprint(os.getppid())")
        assert first.status is second.status is Status.OK and first.stdout != second.stdout
        assert _files_below(own_root) == []
    assert os.listdir(own_root) == []  # the zygotes' base directories are gone, the killed one's too


def test_prefork_off_starts_a_fresh_interpreter_per_run(own_root: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        box = Sandbox(workers=1, tmp_dir=own_root, prefork=False)
    with box:
        results = [box.run("import os\nprint(os.getppid())") for _ in range(2)]
        assert [r.status for r in results] == [Status.OK, Status.OK]
        assert results[0].stdout != results[1].stdout  # a different zygote each time
        assert box._slots._all[0].zygote is None and os.listdir(own_root) == []


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # no seccomp here on purpose
def test_a_daemon_that_left_the_process_group_is_still_ended(work_root: str):
    """Without seccomp, setsid() works: the daemon leaves the run's process group, but as an orphan it comes
    back to the zygote (the subreaper), which ends it before the slot runs again."""
    with Sandbox(workers=1, tmp_dir=work_root, layers={"uid", "landlock", "tmpfs"}) as box:
        if _needs("uid", box.isolation):
            pytest.skip(_needs("uid", box.isolation))
        daemon = textwrap.dedent("""\
            import os, time
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    time.sleep(60)
                os._exit(0)
            time.sleep(0.2)
            print('parent done')
            """)
        result = box.run(daemon, limits=Limits(timeout_s=5.0))
        assert result.status is Status.OK and result.stdout == "parent done\n", result
        assert result.elapsed_s < 3
        assert sandbox_slots.processes_of(result.isolation.uid) == []
        assert box.run("print(1)").stdout == "1\n"


def test_what_the_zygote_cannot_end_is_killed_by_uid(work_root: str, monkeypatch: pytest.MonkeyPatch):
    """When the zygote reports survivors, every process of the slot's uid is killed (a scan of /proc)."""
    from sdpo_unsloth.sandbox import zygote as zygote_module

    clean, killed = zygote_module.Zygote.clean, []
    monkeypatch.setattr(zygote_module.Zygote, "clean", lambda self, timeout_s: clean(self, timeout_s) or True)
    monkeypatch.setattr(sandbox_slots, "kill_uid", lambda uid, timeout_s=3.0: killed.append(uid) or True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        box = Sandbox(workers=1, tmp_dir=work_root)
    with box:
        result = box.run("print(1)")
        assert result.status is Status.OK
        assert killed == ([result.isolation.uid] if result.isolation.uid is not None else [])


# --- disk quota ------------------------------------------------------------------------------------------

FILL_FILES = textwrap.dedent("""\
    import os
    written = 0
    try:
        for i in range({count}):
            with open(f'f{{i}}', 'wb') as handle:
                handle.write(b'x' * {size})
            written += 1
    finally:
        print(written)
    """)


@pytest.fixture(params=["tmpfs", "watched"])
def quota_box(request, work_root: str):
    layers = {"uid", "landlock", "seccomp"} | ({"tmpfs"} if request.param == "tmpfs" else set())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        box = Sandbox(workers=1, tmp_dir=work_root, layers=layers)
    with box:
        if box.isolation.disk_quota != request.param:
            pytest.skip(f"no {request.param} quota here: {box.isolation.description}")
        if _protects_files(box.isolation):
            pytest.skip("the child could write outside its work dir here: the quota would not bound it")
        yield box


# (program, limits, what it hits). Each program tries to write far more than the quota plus the slack.
# A tmpfs refuses the write past the quota (slack: one page, and 8 inodes that an earlier run's Landlock
# domain may still pin). The watched tier kills the run at its next measurement, every 10 ms: it
# overshoots by what the code writes until then (more on a loaded machine), so its slack is wide.
QUOTA_CASES = {
    "100k_small_files": (FILL_FILES.format(count=100_000, size=1024), {"max_files": 500}, "500 files"),
    "one_large_file": (
        "with open('big', 'wb') as handle:\n    for _ in range(256):\n        handle.write(b'x' * (1 << 20))\n",
        {"max_disk_mb": 8, "max_file_mb": 512}, "8 MB",
    ),
    "files_under_the_size_limit": (FILL_FILES.format(count=256, size=1 << 20), {"max_disk_mb": 8, "max_file_mb": 2}, "8 MB"),
}  # fmt: skip


@pytest.mark.parametrize("case", QUOTA_CASES)
def test_disk_quota_holds(case: str, quota_box: Sandbox, canary: str, work_root: str):
    code, limits, hits = QUOTA_CASES[case]
    limits = Limits(timeout_s=20.0, memory_mb=256, **limits)
    result = _guarded_run(quota_box, canary, work_root, code, limits=limits)  # also: the work dir is gone
    assert result.status is Status.ERROR and result.error.startswith("quota exceeded: "), result
    assert hits in result.error
    tmpfs = quota_box.isolation.disk_quota == "tmpfs"
    slack_files, slack_bytes = (8, 8192) if tmpfs else (5_000, 64 << 20)
    if case == "one_large_file":  # one file never outgrows the quota: RLIMIT_FSIZE is capped by it
        slack_bytes = 8192
    assert result.disk_files <= limits.max_files + slack_files
    assert result.disk_bytes <= (limits.max_disk_mb << 20) + slack_bytes


def test_quota_fails_every_check_even_when_the_code_swallows_the_error(quota_box: Sandbox):
    code = FILL_FILES.replace("finally:", "except OSError:\n    pass\nfinally:").format(count=5_000, size=16)
    code += "def f(x):\n    return x\n"
    result = quota_box.run(code, [Check("f", (1,), expected=1)], limits=Limits(max_files=100, timeout_s=20.0))
    assert result.status is Status.ERROR and result.error.startswith("quota exceeded: ")
    assert result.checks[0].status is Status.ERROR and result.checks[0].kind == "quota"
    assert result.disk_files <= 100 + (8 if quota_box.isolation.disk_quota == "tmpfs" else 2_000)


def test_quota_leaves_ordinary_runs_alone(quota_box: Sandbox):
    result = quota_box.run(
        FILL_FILES.format(count=20, size=1000), limits=Limits(max_files=100, max_disk_mb=1)
    )
    assert result.status is Status.OK and result.stdout == "20\n", result
    assert 20 <= result.disk_files <= 22 and result.disk_bytes >= 20 * 1000


# --- reporting, API and building blocks ------------------------------------------------------------------


def test_batch_runs_in_parallel_in_order_on_separate_uids(sandbox: Sandbox):
    jobs = [Job(f"import os\nprint({i}, os.getuid())") for i in range(6)]
    results = sandbox.run_many(jobs)
    assert [int(r.stdout.split()[0]) for r in results] == list(range(6))
    assert all(r.status is Status.OK for r in results)
    uids = {int(r.stdout.split()[1]) for r in results}
    if sandbox.isolation.uid is not None:
        assert uids <= {s.uid for s in sandbox._slots._all} and 0 not in uids


def test_checks_compare_in_the_parent(sandbox: Sandbox):
    code = 'def add(a, b):\n    return a + b\nif __name__ == "__main__":\n    print(input())'
    checks = [
        Check("add", (2, 3), expected=5),
        Check("add", (2, 2), expected=5),
        Check("add", ("a", "b"), expected="ab"),
        Check("add", (True, False), expected=1),  # True + False == 1 (int): fine
        Check("add", (1.5, 1.5), expected=True),  # 3.0 is not True
        Check("sub", (1, 1), expected=0),
        Check("add", ([1], [2]), expected=(1, 2)),  # a tuple expected value compares as a JSON list
        Check(stdin="hello\n", expected="hello"),
        Check(stdin="x\n", expected="y"),
    ]
    result = sandbox.run(code, checks)
    assert [c.status for c in result.checks] == [
        Status.OK, Status.WRONG, Status.OK, Status.OK, Status.WRONG, Status.ERROR, Status.OK, Status.OK,
        Status.WRONG,
    ]  # fmt: skip
    assert result.checks[1].got == 4 and result.checks[5].kind == "missing"
    assert result.status is Status.WRONG and result.passed == 5


def test_a_return_value_that_cannot_be_sent_is_named(sandbox: Sandbox):
    """The feedback says why a return value could not be sent back, not only its type."""
    code = (
        "def deep():\n    v = []\n    for _ in range(200):\n        v = [v]\n    return v\n"
        "def huge():\n    return 10 ** 5000\n"
        "def keyed():\n    return {(1, 2): 3}\n"
        "def odd():\n    return {1, 2}\n"
    )
    checks = [Check(name, (), expected=0) for name in ("deep", "huge", "keyed", "odd")]
    errors = [c.error for c in sandbox.run(code, checks).checks]
    assert "nested more than 100 levels deep" in errors[0]
    assert "ValueError" in errors[1] and "digits" in errors[1]
    assert "dict keys must be strings" in errors[2]
    assert errors[3] == "returned a set object, not a JSON value"


def test_script_mode_reads_stdin_and_reports_errors(sandbox: Sandbox):
    ok = sandbox.run("print(int(input()) * 2)", stdin="21\n")
    assert (ok.status, ok.stdout) == (Status.OK, "42\n")
    big = sandbox.run("import sys\nprint(len(sys.stdin.read()))", stdin="x" * 3_000_000)  # > a pipe buffer
    assert (big.status, big.stdout) == (Status.OK, "3000000\n")
    bad = sandbox.run("x = 1\nraise ValueError('boom')")
    assert bad.status is Status.ERROR and bad.error == "ValueError: boom" and bad.stdout == ""
    syntax = sandbox.run("def f(:\n    pass")
    assert syntax.status is Status.ERROR and syntax.error.startswith("SyntaxError")
    exit_code = sandbox.run("import sys\nsys.exit(3)")
    assert exit_code.status is Status.ERROR and "status 3" in exit_code.error


def test_weaker_layers_are_reported(work_root: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("platform.machine", lambda: "aarch64")  # no seccomp filter for this arch
    with pytest.warns(RuntimeWarning, match="seccomp"):
        box = Sandbox(workers=1, tmp_dir=work_root, layers={"uid", "landlock"})
        result = box.run("import socket\nsocket.socket().close()\nprint('socket opened')")
    with box:
        assert result.isolation.seccomp is False and not result.isolation.network_blocked
        assert result.isolation.level is not IsolationLevel.STRONG
        assert "no seccomp" in result.isolation.description
        assert result.stdout == "socket opened\n"


def test_full_isolation_as_root(sandbox: Sandbox):
    if os.geteuid() != 0:
        pytest.skip("not root: the uid layer is unavailable (covered by the non-root test)")
    iso = sandbox.isolation
    if iso.landlock_abi == 0 or not iso.seccomp:
        pytest.skip(f"this kernel lacks a layer: {iso.description}")
    assert iso.level is IsolationLevel.STRONG and iso.uid >= sandbox_slots.DEFAULT_UID_BASE


def test_non_root_trainer_gets_weaker_isolation_reported(tmp_path):
    """Run the sandbox from a parent that is not root: no uid drop, said so in the result."""
    parent_uid = 65534 if os.geteuid() == 0 else None  # None: this process is already not root
    python = next(
        (p for p in (sys.executable, "/usr/bin/python3") if p and _world_usable(p) and _same_minor(p)), None
    )
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(sdpo_unsloth.__file__)))
    if python is None or not _world_usable(package_root):
        pytest.skip("no interpreter and package path usable by an unprivileged user here")
    script = textwrap.dedent(f"""\
        import json, sys, warnings
        sys.path.insert(0, {package_root!r})
        from sdpo_unsloth.sandbox import Sandbox
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            result = Sandbox(workers=1, tmp_dir='/tmp').run('import os\\nprint(os.getuid())')
        print(json.dumps({{'level': result.isolation.level.value, 'uid': result.isolation.uid,
                          'out': result.stdout, 'warned': [str(w.message) for w in caught]}}))
        """)
    kwargs = {"user": parent_uid, "group": parent_uid, "extra_groups": []} if parent_uid else {}
    done = subprocess.run(
        [python, "-c", script], capture_output=True, text=True, timeout=120, cwd="/tmp", **kwargs
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["uid"] is None and report["level"] != "strong"
    assert report["out"].strip() == str(parent_uid if parent_uid is not None else os.geteuid())
    assert any("trainer's own user" in w for w in report["warned"])


def _world_usable(path: str) -> bool:
    real = os.path.realpath(path)
    parts = real.split("/")
    for i in range(2, len(parts) + 1):
        mode = os.stat("/".join(parts[:i])).st_mode
        if not mode & stat.S_IXOTH:
            return False
    return True


def _same_minor(python: str) -> bool:
    try:
        out = subprocess.run([python, "-c", "import sys; print(sys.version_info[:2] >= (3, 11))"],
                             capture_output=True, text=True, timeout=30)  # fmt: skip
    except OSError:
        return False
    return out.stdout.strip() == "True"


def test_a_failed_uid_drop_never_runs_the_code(work_root: str, monkeypatch: pytest.MonkeyPatch, tmp_path):
    """uid (uid_t)-1 makes setresuid a no-op: the child stays root, notices, and refuses to run."""
    if os.geteuid() != 0:
        pytest.skip("uid slots need root")
    lock = os.open(tmp_path / "lock", os.O_RDWR | os.O_CREAT)
    monkeypatch.setattr(sandbox_slots, "claim_uid", lambda start: (2**32 - 1, lock))
    marker = tmp_path / "ran"
    with Sandbox(workers=1, tmp_dir=work_root) as box, pytest.raises(SandboxError, match="did not take"):
        box.run(f"open({str(marker)!r}, 'w')")
    assert not marker.exists()


def test_two_sandboxes_never_share_a_uid(work_root: str):
    if os.geteuid() != 0:
        pytest.skip("uid slots need root")
    with Sandbox(workers=1, tmp_dir=work_root) as a, Sandbox(workers=1, tmp_dir=work_root) as b:
        slot_a, slot_b = a._slots.acquire(), b._slots.acquire()
        assert slot_a.uid != slot_b.uid
        a._slots.release(slot_a)
        b._slots.release(slot_b)


def _run_bpf(program: list[tuple[int, int, int, int]], nr: int, arg0: int = 0, arch: int = 0xC000003E) -> int:
    """A tiny classic-BPF interpreter for the opcodes the filter uses."""
    data = struct.pack("=iIQ6Q", nr, arch, 0, arg0, 0, 0, 0, 0, 0)
    pc, acc = 0, 0
    while True:
        code, jt, jf, k = program[pc]
        if code == 0x06:
            return k
        if code == 0x20:
            acc, pc = struct.unpack_from("=I", data, k)[0], pc + 1
            continue
        taken = {0x15: acc == k, 0x35: acc >= k, 0x45: bool(acc & k)}[code]
        pc += 1 + (jt if taken else jf)


@pytest.mark.parametrize(
    ("nr", "arg0", "arch", "verdict"),
    [
        (0, 0, None, "allow"),  # read
        (41, 2, None, "eperm"),  # socket(AF_INET)
        (59, 0, None, "eperm"),  # execve
        (101, 0, None, "eperm"),  # ptrace
        (62, 4242, None, "allow"),  # kill(self)
        (62, 1, None, "eperm"),  # kill(1)
        (62, 0xFFFFFFFF, None, "eperm"),  # kill(-1)
        (234, 4242, None, "allow"),  # tgkill(self, ...)
        (56, 0x10000000, None, "eperm"),  # clone(CLONE_NEWUSER)
        (56, 0x00010000 | 0x00000100, None, "allow"),  # clone(CLONE_THREAD | CLONE_VM)
        (435, 0, None, "enosys"),  # clone3: fall back to clone
        (425, 0, None, "eperm"),  # io_uring_setup
        (0x40000000 + 41, 0, None, "eperm"),  # x32 ABI
        (0, 0, 0x40000003, "kill"),  # i386 syscalls
    ],
)
def test_seccomp_program(nr: int, arg0: int, arch: int | None, verdict: str):
    program = sandbox_child.seccomp_program(own_pid=4242)
    expected = {"allow": 0x7FFF0000, "eperm": 0x00050001, "enosys": 0x00050026, "kill": 0x80000000}[verdict]
    assert _run_bpf(program, nr, arg0, arch or 0xC000003E) == expected


def test_child_json_encoder_sends_only_plain_values():
    class Sneaky(int):
        def __eq__(self, other):
            return True

        def __repr__(self):
            return "999"

    assert json.loads(sandbox_child.to_json([Sneaky(3), (1, "é\n\x00"), {"k": None, 2: 1.5}])) == [
        3, [1, "é\n\x00"], {"k": None, "2": 1.5}
    ]  # fmt: skip
    for bad in ({1, 2}, object(), [[[]]] * 1 + [float], {(1, 2): 3}):
        with pytest.raises(TypeError):
            sandbox_child.to_json(bad)


@pytest.mark.parametrize(
    ("got", "expected", "equal"),
    [(6, 6, True), (6.0, 6, True), (0.1 + 0.2, 0.3, True), (True, 1, False), (1, True, False), ("6", 6, False),
     ([1, 2], [1, 2], True), ([1, 2], [2, 1], False), ({"a": [1]}, {"a": [1]}, True), (None, 0, False),
     ([True], [1], False), ({"a": 1}, {"a": 1, "b": 2}, False)],
)  # fmt: skip
def test_values_equal(got, expected, equal):
    assert values_equal(got, expected) is equal


def test_outputs_equal_ignores_trailing_whitespace_only():
    assert outputs_equal("1 2\r\n3  \n\n", "1 2\n3")
    assert not outputs_equal("1  2", "1 2")


def test_invalid_arguments_name_the_fix():
    with pytest.raises(ValueError, match="`timeout_s` must be a positive"):
        Limits(timeout_s=0)
    with pytest.raises(ValueError, match="`memory_mb` must be an integer >= 64"):
        Limits(memory_mb=8)
    with pytest.raises(ValueError, match="identifier"):
        Check("not valid", ())
    with pytest.raises(ValueError, match="not both"):
        Check("f", (), stdin="x")
    with pytest.raises(ValueError, match="subset"):
        Sandbox(layers={"chroot"})


def test_uid_kill_leaves_other_users_alone():
    """`kill_uid` on a uid nobody uses finds nothing, and the scan sees this process as root/us."""
    assert sandbox_slots.processes_of(sandbox_slots.DEFAULT_UID_BASE + sandbox_slots.UID_SEARCH + 7) == []
    assert os.getpid() in sandbox_slots.processes_of(os.geteuid())
    assert sandbox_slots.kill_uid(sandbox_slots.DEFAULT_UID_BASE + sandbox_slots.UID_SEARCH + 7)
