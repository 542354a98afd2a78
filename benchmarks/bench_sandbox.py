"""Sandbox throughput: executions per second and overhead per execution, serial vs a worker pool.

Measures, on this machine:

- ``bare spawn``: ``python -I -S -c pass`` started with ``subprocess.run`` (the floor of any fresh child);
- ``trivial``: `Sandbox.run` of ``x = 1`` (start, confine, run, kill by group and uid, remove the work dir);
- ``5 checks``: a function checked on 5 inputs in one child (what the code reward runs per completion);
- ``reward batch``: `CodeExecutionReward` on 16 completions x 5 tests (one generation batch).

Serial runs use one worker; pool runs use one worker per CPU (`run_many`). It writes its table, with
the command and the date, into the ``sandbox`` section of ``docs/benchmarks.md``.

    OMP_NUM_THREADS=1 python benchmarks/bench_sandbox.py            # ~30 s on 2 cores
    OMP_NUM_THREADS=1 python benchmarks/bench_sandbox.py --runs 50 --no-write
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sdpo_unsloth.rewards.code import CodeExecutionReward
from sdpo_unsloth.sandbox import Check, Job, Limits, Sandbox, Status

TRIVIAL = "x = 1"
FIVE = "def total(xs):\n    return sum(xs)"
FIVE_CHECKS = tuple(Check("total", ([i, i + 1],), expected=2 * i + 1) for i in range(5))


def _serial(box: Sandbox, job: Job, runs: int) -> tuple[float, list[float]]:
    latencies = []
    start = time.perf_counter()
    for _ in range(runs):
        t0 = time.perf_counter()
        result = box.run(job.code, job.checks)
        latencies.append(time.perf_counter() - t0)
        assert result.status is Status.OK, result
    return time.perf_counter() - start, latencies


def _pool(box: Sandbox, job: Job, runs: int) -> float:
    start = time.perf_counter()
    results = box.run_many([job] * runs)
    assert all(r.status is Status.OK for r in results)
    return time.perf_counter() - start


def _bare_spawn(runs: int) -> tuple[float, list[float]]:
    latencies = []
    start = time.perf_counter()
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-I", "-S", "-c", "pass"], check=True)
        latencies.append(time.perf_counter() - t0)
    return time.perf_counter() - start, latencies


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


def _row(case: str, workers: int, runs: int, wall: float, latencies: list[float] | None = None) -> str:
    median = f"{1000 * statistics.median(latencies):.1f}" if latencies else "–"
    return f"| {case} | {workers} | {runs} | {wall:.2f} | {runs / wall:.1f} | {1000 * wall / runs:.1f} | {median} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100, help="executions per serial case (pool: twice)")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()
    cpus = len(os.sched_getaffinity(0))
    warnings.simplefilter("ignore", RuntimeWarning)  # the isolation level is in the table
    serial_box = Sandbox(workers=1, limits=Limits(timeout_s=5.0))
    pool_box = Sandbox(workers=cpus, limits=Limits(timeout_s=5.0))
    isolation = serial_box.isolation
    pool_box.run_many([Job(TRIVIAL)] * cpus)  # warm up: claim every slot's uid
    load = os.getloadavg()[0]
    parallelism = _parallelism(cpus)

    rows = []
    wall, lat = _bare_spawn(args.runs)
    rows.append(_row("bare spawn (`python -I -S -c pass`)", 1, args.runs, wall, lat))
    for name, job in (("trivial snippet", Job(TRIVIAL)), ("function + 5 checks", Job(FIVE, FIVE_CHECKS))):
        wall, lat = _serial(serial_box, job, args.runs)
        rows.append(_row(f"sandbox, {name}", 1, args.runs, wall, lat))
        rows.append(_row(f"sandbox, {name}", cpus, 2 * args.runs, _pool(pool_box, job, 2 * args.runs)))

    reward = CodeExecutionReward(sandbox=pool_box)
    tests = json.dumps([{"function": "total", "args": [[i, i + 1]], "expected": 2 * i + 1} for i in range(5)])
    completions = [f"```python\n{FIVE}\n```"] * 16
    batches = max(3, args.runs // 20)
    start = time.perf_counter()
    for _ in range(batches):
        assert reward(prompts=["p"] * 16, completions=completions, tests=[tests] * 16) == [1.0] * 16
    wall = time.perf_counter() - start
    per_batch = wall / batches
    rows.append(
        f"| reward batch, 16 completions x 5 tests | {cpus} | {16 * batches} | {wall:.2f} | "
        f"{16 * batches / wall:.1f} | {1000 * wall / (16 * batches):.1f} | {1000 * per_batch:.0f} per batch |"
    )
    serial_box.close()
    pool_box.close()

    command = "OMP_NUM_THREADS=1 python benchmarks/bench_sandbox.py" + (
        f" --runs {args.runs}" if args.runs != 100 else ""
    )
    text = "\n".join([
        "## Sandbox: executions per second and overhead per execution",
        "",
        f"Produced by `{command}` on {datetime.date.today().isoformat()}: {cpus} CPUs "
        f"({platform.processor() or platform.machine()}), Linux {platform.release()}, Python "
        f"{platform.python_version()}, running as {'root' if os.geteuid() == 0 else 'a normal user'}, "
        f"load average {load:.2f} at the start (the machine is shared: {cpus} busy processes ran "
        f"{parallelism:.1f}x as fast as one, which bounds the pool's gain). Isolation: {isolation.level.value} "
        f"(uid={isolation.uid}, seccomp={isolation.seccomp}, Landlock ABI {isolation.landlock_abi}).",
        "",
        "Every sandbox run starts a fresh `python -I -S` child that confines itself, runs the code, is killed "
        "by process group and uid, and has its work directory removed. *ms per exec* = wall time / runs "
        "(the cost per execution at that parallelism); *median latency* = one serial run, start to result.",
        "",
        "| case | workers | runs | wall (s) | exec/s | ms per exec | median latency (ms) |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ])  # fmt: skip
    print(text)
    if not args.no_write:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from bench_doc import write_section

        write_section("sandbox", text)


if __name__ == "__main__":
    main()
