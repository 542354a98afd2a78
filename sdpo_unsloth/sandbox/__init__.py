"""Run untrusted, model-written Python in a confined child process. Standard library only.

Each worker slot has a **zygote**: a ``python -I -S`` harness (`child.py`) started once with
``subprocess`` (no fork of the big trainer process, no ``preexec_fn``) in its own session with a
scrubbed environment. The zygote never runs untrusted code: for every run it forks a fresh child, in a
new session, with a fresh work directory (removed afterwards) and an environment holding only ``PATH``,
``LANG``, ``HOME`` and ``TMPDIR`` (no ``HF_TOKEN``, ``WANDB_API_KEY``, cloud keys). Every run thus gets
fresh process state (a copy of the idle zygote) for the cost of a ``fork`` instead of an interpreter
start; ``Sandbox(prefork=False)`` starts a fresh zygote per run instead (slower; same isolation). Before
any untrusted byte runs, the forked child confines itself; the layers it managed to apply are reported
on every result as an `Isolation`:

- **uid** (parent is root): the child drops to a dedicated unprivileged uid, one per worker slot. Each
  slot's uid is locked against other processes on the machine and reused only when no process of it
  is left: after every run its process group is killed and the zygote, the subreaper of every process
  the run started, reaps them all (and kills any that escaped the group); if some still remain, every
  process of the uid is killed (found by a scan of ``/proc``).
- **Landlock** (Linux 5.13+): writes only below the work directory; reads only from the Python
  standard library, system libraries and the work directory; no TCP (6.7+); no signals or abstract
  unix sockets outside the sandbox (6.12+).
- **seccomp** (x86_64): refuses ``socket``, ``execve``, ``ptrace``, ``process_vm_*``, namespace and
  mount calls, ``io_uring``, ``bpf``, ``setsid``/``setpgid`` and signals to any other process.
- **rlimits** (always): address space, CPU seconds, file size, open files, processes, no core dumps;
  plus a wall-clock timeout per check enforced by the parent.
- **disk quota** (always; `Limits.max_disk_mb`, `Limits.max_files`): with root and a private mount
  namespace (layer ``tmpfs``) the work dir is a tmpfs of that size and inode count, so the kernel refuses
  the write past the quota; otherwise the zygote measures the work dir every 10 ms and kills the run
  over it (it can overshoot by what is written in 10 ms). Either way the run ends with the error
  ``quota exceeded: ...`` and its work dir is removed. `Isolation.disk_quota` says which tier ran.

With all three layers the level is ``strong``. It protects the trainer against: infinite loops and CPU
burn, memory bombs, fork bombs, huge files and many files, output floods (captured with a cap, decoded with
replacement), reading the trainer's environment or memory (``/proc/<ppid>/environ``, ``/mem``),
reading other files (``~/.cache/huggingface/token``, a world-readable ``.env``), deleting or changing
files outside the work directory, killing or tracing the trainer, network access, running programs
(``os.system``), daemons that outlive the run (every descendant comes back to the zygote, which
reaps it), filling the disk through the work directory, and results faked by the code under test: expected
values never enter the child, outputs are compared in the parent as plain JSON values (an object whose
``__eq__`` is always true is not a JSON value), and exiting before the tests run fails them.

It does **not** protect against: kernel exploits (seccomp here is a deny-list, the rest of the kernel
is reachable); contention, since children share the machine's CPUs and page cache with the trainer
(limits are per child, so ``workers * (memory_mb + max_disk_mb)`` can be in use: a tmpfs work dir is
RAM); writes outside the work dir where Landlock is missing (``/tmp``, ``/dev/shm`` have no quota);
telling runs of one zygote apart (they share its hash seed and address layout); reading the
Python standard library and system libraries (allowed by design); timing side channels. Without root
the uid layer is missing; without Landlock, world-readable files (and world-usable devices such as
``/dev/nvidia*``) can be opened and world-writable directories (``/tmp``, ``/dev/shm``) written; without seccomp (non-x86_64), sockets, ``execve`` and
signals are not filtered. `Isolation.description` lists what is missing; a weaker level warns once.

The child has only the standard library (``-S``: no site-packages). Linux only.

>>> result = run("print(sum(range(4)))")
>>> str(result.status), result.stdout
('ok', '6\\n')
>>> result = run("def add(a, b): return a - b", [Check("add", (2, 3), expected=5)])
>>> str(result.status), result.checks[0].got
('wrong', -1)
"""

from __future__ import annotations

from . import results
from .errors import SandboxError as SandboxError
from .results import *  # noqa: F403 (the result types, re-exported as listed in results.__all__)
from .runner import LAYERS as LAYERS
from .runner import Sandbox as Sandbox
from .runner import default_sandbox as default_sandbox
from .runner import run as run
from .runner import run_many as run_many

__all__ = sorted(
    [*results.__all__, "LAYERS", "Sandbox", "SandboxError", "default_sandbox", "run", "run_many"]
)
