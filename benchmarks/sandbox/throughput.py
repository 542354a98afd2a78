"""Sandbox throughput: executions per second and CPU per execution, before and after the zygote pool.

Measures, in one run on this machine:

- ``bare spawn``: ``python -I -S -c pass`` started with ``subprocess.run`` (the floor of any fresh child);
- ``old path``: the sandbox as it was before the zygote (a fresh ``python -I -S`` child per run), loaded
  from git (`--before-ref`, default: the last commit with ``sdpo_unsloth/sandbox.py``); skipped without git;
- ``fresh zygote``: `Sandbox(prefork=False)`: a fresh interpreter per run, then a fork;
- ``zygote pool, no warm-up``: the pool as it was before its zygote warmed up what each child initialised
  after the fork (the compiler's AST types), loaded from git (`--pool-before-ref`, default: the commit
  before the one adding ``_warm_up``); skipped without git history;
- ``zygote pool``: `Sandbox()` (the default): one pre-started zygote per worker forks a child per run.

Cases: a trivial program (``x = 1``), a function checked on 5 inputs in one child, and a
`CodeExecutionReward` batch of 16 completions x 5 tests. Serial rows use one worker; pool rows one worker
per CPU (`run_many`). *CPU ms per exec* is the CPU time of the trainer process and of every process the
sandbox started (zygotes, children), divided by the runs: unlike wall time it hardly depends on what else
the machine runs, and ``CPUs / CPU per exec`` bounds the rate an idle machine could reach. It writes its
table, with the command and the date, into the ``sandbox`` section of ``docs/benchmarks.md``.

    OMP_NUM_THREADS=1 python benchmarks/sandbox/throughput.py            # ~3 min on 2 shared cores
    OMP_NUM_THREADS=1 python benchmarks/sandbox/throughput.py --runs 50 --no-write
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from sdpo_unsloth.rewards.code import CodeExecutionReward
from sdpo_unsloth.sandbox import Check, Job, Limits, Sandbox, Status

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRIVIAL = "x = 1"
FIVE = "def total(xs):\n    return sum(xs)"
FIVE_CHECKS = tuple(Check("total", ([i, i + 1],), expected=2 * i + 1) for i in range(5))
OLD_FILES = ("sandbox.py", "sandbox_child.py", "sandbox_results.py", "sandbox_slots.py")
OLD_PATH, FRESH_PATH = "old path (fresh child per run)", "fresh zygote per run (`prefork=False`)"
COLD_PATH, POOL_PATH = "zygote pool, no warm-up (before)", "zygote pool (default)"
WARM_UP = "def _warm_up"  # the commit adding it to sandbox/child.py is the "before" of the pool
POOL_FILES = ("__init__.py", "child.py", "errors.py", "results.py", "runner.py", "slots.py", "zygote.py")


def _cpu() -> tuple[float, float]:
    """CPU seconds of this process, and of every reaped descendant (zygotes include their children)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True, check=True).stdout


def _commit_before(*log_args: str) -> str:
    """The parent of the newest commit matching ``git log -1 <log_args>``."""
    found = _git("log", "-1", "--format=%H", *log_args).strip()
    if not found:
        raise ValueError(f"no commit matches git log {' '.join(log_args)}")
    return f"{found}^"


@contextlib.contextmanager
def _sandbox_from_git(ref: Callable[[], str], folder: str, files: tuple[str, ...]) -> Iterator[type | None]:
    """A past `Sandbox` class from git, as a throwaway package: `files` of `folder` at the commit `ref()`
    names; None where git cannot give it (no git, a shallow clone)."""
    try:
        at = ref()
        sources = {name: _git("show", f"{at}:{folder}/{name}") for name in files}
    except (OSError, ValueError, subprocess.CalledProcessError):
        yield None
        return
    with tempfile.TemporaryDirectory() as tmp:
        package = "past_sandbox_" + os.urandom(4).hex()
        os.mkdir(os.path.join(tmp, package))
        open(os.path.join(tmp, package, "__init__.py"), "w").close()
        for name, text in sources.items():
            with open(os.path.join(tmp, package, name), "w") as handle:
                handle.write(text)
        sys.path.insert(0, tmp)
        try:
            yield importlib.import_module(
                f"{package}.{'sandbox' if 'sandbox.py' in files else 'runner'}"
            ).Sandbox
        finally:
            sys.path.remove(tmp)


Measured = tuple[int, float, float, float]  # runs, wall s, CPU s of this process, CPU s of its descendants


def _measure(make: Callable[[], object], body: Callable[[object], int]) -> Measured:
    """`body(sandbox)` on a fresh sandbox, closed (and its zygotes reaped) inside the measurement."""
    box = make()
    box.run_many([Job(TRIVIAL)] * box.workers)  # warm up: claim the uids (zygote starts stay counted)
    (own, kids), start = _cpu(), time.perf_counter()
    runs = body(box)
    wall = time.perf_counter() - start
    box.close()
    own_after, kids_after = _cpu()
    return runs, wall, own_after - own, kids_after - kids


def _serial(job: Job, runs: int) -> Callable[[object], int]:
    def body(box) -> int:
        for _ in range(runs):
            result = box.run(job.code, job.checks)
            assert result.status is Status.OK or str(result.status) == "ok", result
        return runs

    return body


def _pool(job: Job, runs: int) -> Callable[[object], int]:
    def body(box) -> int:
        results = box.run_many([job] * runs)
        assert all(str(r.status) == "ok" for r in results)
        return runs

    return body


def _reward(batches: int) -> Callable[[object], int]:
    tests = json.dumps([{"function": "total", "args": [[i, i + 1]], "expected": 2 * i + 1} for i in range(5)])
    completions = [f"```python\n{FIVE}\n```"] * 16

    def body(box) -> int:
        reward = CodeExecutionReward(sandbox=box)
        for _ in range(batches):
            assert reward(prompts=["p"] * 16, completions=completions, tests=[tests] * 16) == [1.0] * 16
        return 16 * batches

    return body


def _bare_spawn(runs: int) -> Measured:
    (own, kids), start = _cpu(), time.perf_counter()
    for _ in range(runs):
        subprocess.run([sys.executable, "-I", "-S", "-c", "pass"], check=True)
    own_after, kids_after = _cpu()
    return runs, time.perf_counter() - start, own_after - own, kids_after - kids


def _bare_fork(runs: int) -> Measured:
    """An idle ``python -I -S`` forking children that exit at once: the floor of any Python zygote."""
    script = (
        "import os, resource, time\nstart = time.perf_counter()\n"
        f"for _ in range({runs}):\n    pid = os.fork()\n    if pid == 0:\n        os._exit(0)\n    os.waitpid(pid, 0)\n"
        "own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)\n"
        "print(time.perf_counter() - start, own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime)"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", script], capture_output=True, text=True, check=True
    )
    wall, own, kids = (float(x) for x in out.stdout.split())
    return runs, wall, 0.0, own + kids  # all of it outside the trainer process


def _child_faults() -> int:
    """Page faults a forked child has taken when the untrusted code starts (median of 21 runs)."""
    probe = "import resource\nprint(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)"
    with Sandbox(workers=1) as box:
        return int(statistics.median(int(box.run(probe).stdout) for _ in range(21)))


def _parallelism(cpus: int) -> float:
    """How many CPUs this process really gets now: speedup of `cpus` busy processes over one."""
    busy = [sys.executable, "-I", "-S", "-c", "s = 0\nfor i in range(2_000_000):\n    s += i"]
    start = time.perf_counter()
    subprocess.run(busy, check=True)
    one = time.perf_counter() - start
    start = time.perf_counter()
    for proc in [subprocess.Popen(busy) for _ in range(cpus)]:
        proc.wait()
    return cpus * one / (time.perf_counter() - start)


def _rate(row: str) -> float:
    return float(row.split("**")[1])


def _row(case: str, path: str, workers: int, measured: Measured, cpus: int) -> str:
    runs, wall, own, kids = measured
    per = 1000 * (own + kids) / runs
    return (
        f"| {case} | {path} | {workers} | {runs} | {wall:.2f} | **{runs / wall:.0f}** | {1000 * wall / runs:.2f} | "
        f"{per:.2f} | {1000 * own / runs:.2f} | {1000 * cpus / per:.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200, help="executions per serial case (pool: 4x)")
    parser.add_argument("--before-ref", default=None, help="git ref holding the pre-zygote sandbox")
    parser.add_argument(
        "--pool-before-ref", default=None, help="git ref holding the zygote pool before its warm-up"
    )
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()
    cpus = len(os.sched_getaffinity(0))
    warnings.simplefilter("ignore", RuntimeWarning)  # the isolation level is in the text
    limits = Limits(timeout_s=5.0)
    with Sandbox(workers=1, limits=limits) as probe:
        isolation = probe.isolation
    load = os.getloadavg()[0]
    parallelism = _parallelism(cpus)
    runs, pool_runs, batches = args.runs, 4 * args.runs, max(3, args.runs // 10)

    rows = [
        _row("bare spawn (`python -I -S -c pass`)", "–", 1, _bare_spawn(runs), cpus),
        _row("bare fork + exit of an idle `python -I -S`", "–", 1, _bare_fork(4 * runs), cpus),
    ]
    with contextlib.ExitStack() as stack:
        old = stack.enter_context(
            _sandbox_from_git(
                lambda: args.before_ref or _commit_before("--", "sdpo_unsloth/sandbox_child.py"),
                "sdpo_unsloth",
                OLD_FILES,
            )
        )
        cold = stack.enter_context(
            _sandbox_from_git(
                lambda: (
                    args.pool_before_ref
                    or _commit_before("-S", WARM_UP, "--", "sdpo_unsloth/sandbox/child.py")
                ),
                "sdpo_unsloth/sandbox",
                POOL_FILES,
            )
        )
        paths: list[tuple[str, Callable[[int], object]]] = []
        if old is not None:
            paths.append((OLD_PATH, lambda n: old(workers=n, limits=limits)))
        paths.append((FRESH_PATH, lambda n: Sandbox(workers=n, limits=limits, prefork=False)))
        if cold is not None:
            paths.append((COLD_PATH, lambda n: cold(workers=n, limits=limits)))
        paths.append((POOL_PATH, lambda n: Sandbox(workers=n, limits=limits)))
        for case, job in (("trivial program", Job(TRIVIAL)), ("function + 5 checks", Job(FIVE, FIVE_CHECKS))):
            for path, make in paths:
                rows.append(_row(case, path, 1, _measure(lambda m=make: m(1), _serial(job, runs)), cpus))
                rows.append(
                    _row(case, path, cpus, _measure(lambda m=make: m(cpus), _pool(job, pool_runs)), cpus)
                )
        for path, make in paths[-2:]:  # more slots than CPUs: one run's wake-ups overlap another's work
            measured = _measure(lambda m=make: m(2 * cpus), _pool(Job(TRIVIAL), pool_runs))
            rows.append(_row("trivial program", path, 2 * cpus, measured, cpus))
        for path, make in paths:
            measured = _measure(lambda m=make: m(cpus), _reward(batches))
            rows.append(_row("reward batch, 16 completions x 5 tests", path, cpus, measured, cpus))
    for missing, files in ((old, OLD_FILES), (cold, POOL_FILES)):
        if missing is None:
            print(f"(a past sandbox is not in this clone's git history: {files[1]})", file=sys.stderr)
    faults = _child_faults()
    rates = {
        path: max(
            _rate(r) for r in rows if r.startswith(f"| trivial program | {path} |") and "| 1 |" not in r
        )
        for path in (COLD_PATH, POOL_PATH)
        if any(f"| {path} |" in r for r in rows)
    }
    best = max(
        (r for r in rows if r.startswith(f"| trivial program | {POOL_PATH} |") and "| 1 |" not in r),
        key=_rate,
    )
    rate, bound = _rate(best), float(best.rstrip(" |").rsplit("|", 1)[1])
    shared = parallelism < 0.8 * cpus
    batch = {  # ms for one reward batch of 16 completions x 5 tests
        path: 16 * 1000 * float(r.split("|")[5]) / int(r.split("|")[4])
        for r in rows
        if r.startswith("| reward batch")
        for path in (r.split("|")[2].strip(),)
    }
    before = (
        f" The pool before the warm-up, measured in this run: {rates[COLD_PATH]:.0f}/s (best pool row), so the "
        f"warm-up gives {rates[POOL_PATH] / rates[COLD_PATH]:.2f}x; a reward batch of 16 completions x 5 tests "
        f"takes {batch[POOL_PATH]:.0f} ms (before: {batch[COLD_PATH]:.0f} ms)."
        if COLD_PATH in rates and COLD_PATH in batch
        else f" A reward batch of 16 completions x 5 tests takes {batch[POOL_PATH]:.0f} ms."
    )
    verdict = (
        f"**Target >= 500 exec/s on {cpus} cores (trivial program): {'met' if rate >= 500 else 'missed'}** "
        f"({rate:.0f}/s wall, best pool row; {bound:.0f}/s bound from its CPU per exec on {cpus} idle CPUs)."
        f"{before} Where the CPU goes: the trainer process spends the *trainer CPU* column; the rest is the "
        "zygote and its forked child. The zygote runs once what every child would otherwise initialise after its "
        "fork (CPython builds its compiler's AST types on the first `compile`, ~1 ms, which was half of a run's "
        "CPU; the seccomp buffer's ctypes type), so a child starts with those pages shared. "
        f"A child has taken {faults} page faults (copy-on-write copies of the zygote's pages that CPython "
        "touches: refcounts, the I/O stack) by the time the untrusted code starts; a bare fork + exit of an idle "
        "Python costs the *bare fork* row."
    )

    command = "OMP_NUM_THREADS=1 python benchmarks/sandbox/throughput.py" + (
        f" --runs {args.runs}" if args.runs != 200 else ""
    )
    text = "\n".join([
        "## Sandbox: executions per second and CPU per execution",
        "",
        f"Produced by `{command}` on {datetime.date.today().isoformat()}: {cpus} CPUs "
        f"({platform.processor() or platform.machine()}), Linux {platform.release()}, Python "
        f"{platform.python_version()}, running as {'root' if os.geteuid() == 0 else 'a normal user'}, "
        f"load average {load:.2f} at the start; {cpus} busy processes ran {parallelism:.1f}x as fast as one"
        f"{' (the machine was shared with other jobs: wall-time rates are lower bounds)' if shared else ''}. Isolation: "
        f"{isolation.level.value} (uid={isolation.uid}, seccomp={isolation.seccomp}, Landlock ABI "
        f"{isolation.landlock_abi}, disk quota: {isolation.disk_quota or 'none'}).",
        "",
        "*exec/s* and *ms per exec* are wall time (the pool rows run `workers` at a time); *CPU ms per exec* "
        "counts the trainer process and every process the sandbox started (zygote starts included); *idle-machine bound* = CPUs / CPU "
        "per exec, the rate these CPUs could sustain if nothing else ran. Old path: the sandbox before the "
        "zygote, loaded from git; no warm-up: the zygote pool before `_warm_up`, loaded from git.",
        "",
        "| case | path | workers | runs | wall (s) | exec/s | ms per exec | CPU ms per exec | of which trainer CPU | idle-machine bound (exec/s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        verdict,
    ])  # fmt: skip
    print(text)
    if not args.no_write:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from common import write_section

        write_section("sandbox", text)


if __name__ == "__main__":
    main()
