"""The GPU benchmark and the recompile emulation run on CPU before they spend scarce device minutes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def _run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", SDPO_UNSLOTH_BACKEND="transformers")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        cwd=cwd,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_gpu_step_tiny_records_grpo_and_sdpo(tmp_path):
    """`gpu_step.py --tiny` runs both trainers through a stage child and writes one result per run, with
    per-step times, compile counts and (SDPO only) the distillation loss that proves the SDPO loss ran."""
    out = tmp_path / "out"
    _run("speed/gpu_step.py", "--tiny", "--out", str(out), "--budget", "300", cwd=tmp_path)
    results = json.loads((out / "gpu_step.json").read_text())["results"]
    by_run = {r["run"]: r for r in results}
    assert set(by_run) == {"grpo", "sdpo"}, [r.get("status") for r in results]
    for run, r in by_run.items():
        assert r["status"] == "ok", (run, r["status"])
        assert r["steps_done"] == 3  # 1 warm-up + 2 measured (--tiny)
        assert len(r["step_times_s"]) == len(r["new_dynamo_graphs"]) == len(r["recompile_reasons"]) == 3
        assert r["median_step_s"] > 0
        assert r["completion_mean_length"] == [16.0, 16.0, 16.0]  # forced to max_completion_length
    assert len(by_run["sdpo"]["distill_loss"]) == 3 and all(x > 0 for x in by_run["sdpo"]["distill_loss"])
    assert by_run["grpo"]["distill_loss"] == []
    assert by_run["sdpo"]["teacher_adapter_params"] == by_run["sdpo"]["student_adapter_params"]


def test_compile_count_emulation_shows_stable_shapes_end_recompiles_after_step_one(tmp_path):
    """The emulated regional compile: only SDPO (teacher forward under no_grad) compiles a grad-mode variant;
    without stable shapes SDPO compiles again at step 3 (the first micro-batch with padding), with them never
    after step 1."""
    proc = _run("investigations/compile_count.py", "--steps", "3", cwd=tmp_path)
    new = {}
    for line in proc.stdout.splitlines():
        if ": new graphs per step " in line:
            name, rest = line.split(": new graphs per step ", 1)
            new[name] = (json.loads(rest.split(";", 1)[0]), rest)
    assert set(new) == {
        f"{data} / {run}"
        for data in ("full", "varied")
        for run in ("GRPO", "SDPO, stable_shapes off (before)", "SDPO")
    }, proc.stdout[-2000:]
    for name, (counts, rest) in new.items():
        assert len(counts) == 3 and counts[0] > 0 and min(counts) >= 0, name
        assert ("grad mode" in rest) == ("SDPO" in name), name
    assert new["full / SDPO, stable_shapes off (before)"][0][2] > 0  # the first padded micro-batch
    assert new["full / SDPO"][0][1:] == [0, 0] and new["varied / SDPO"][0][1:] == [0, 0]
