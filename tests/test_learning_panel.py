"""benchmarks/learning.py as a per-task panel: real runs on a tiny model, resumable, summarised per task."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import learning_report as report  # noqa: E402

GYM = "gym:chain_sum?min_terms=2&max_terms=2&max_digits=1"


def _learning(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", SDPO_UNSLOTH_BACKEND="transformers")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "learning.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        cwd=cwd,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_panel_runs_every_task_and_method_then_resumes(tmp_path, tiny_model_dir):
    pytest.importorskip("reasoning_gym")
    out = tmp_path / "panel.jsonl"
    run = (
        *("--model", tiny_model_dir, "--tasks", f"addition,{GYM}", "--methods", "grpo,sdpo", "--seeds", "0"),
        *("--max-steps", "2", "--eval-every", "1", "--max-completion-length", "4", "--held-size", "4"),
        *("--out", str(out)),
    )
    _learning(*run, cwd=tmp_path)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    done = {(r["task"], r["method"]) for r in records if r["kind"] == "done"}
    assert done == {(t, m) for t in ("addition", GYM) for m in ("grpo", "sdpo")}
    for task in ("addition", GYM):
        evals = [r for r in records if r["kind"] == "eval" and r["task"] == task]
        assert [r["step"] for r in evals] == [0, 1, 2, 0, 1, 2]  # grpo then sdpo, every step
        assert all(r["held"] == 4 and r["max_completion_length"] == 4 for r in evals)
        first, second = (r for r in evals if r["step"] == 0)
        assert "reused" not in first and second["reused"] is True and second["acc"] == first["acc"]

    again = _learning(*run, cwd=tmp_path)  # finished runs are skipped, nothing is trained again
    assert again.stdout.count("skip ") == 4
    after = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r for r in after if r["kind"] != "command"] == [r for r in records if r["kind"] != "command"]

    summary = report.summarise(*report.load(out))
    assert list(summary) == ["addition", GYM]
    assert [r["method"] for r in summary[GYM]] == ["grpo", "sdpo"]
    assert report.commands(out)[0] == list(run)


def _records(task: str, method: str, finals: list[float]) -> list[dict]:
    rows = []
    for seed, final in enumerate(finals):
        base = {"task": task, "method": method, "seed": seed, "lr": 5e-4}
        rows += [
            {**base, "kind": "eval", "step": 0, "acc": 0.25},
            {**base, "kind": "eval", "step": 20, "acc": final},
            {**base, "kind": "done", "s_per_step": 4.0},
        ]
    return rows


def test_summary_reports_every_seed_mean_spread_and_where_sdpo_is_below(tmp_path):
    out = tmp_path / "runs.jsonl"
    records = (
        _records("code", "grpo", [0.5, 0.7, 0.6])
        + _records("code", "sdpo", [0.4, 0.5, 0.6])
        + _records("addition", "grpo", [0.25, 0.25])
        + _records("addition", "sdpo", [0.75, 1.0])
        + [{"task": "code", "method": "sdpo", "seed": 3, "lr": 5e-4, "kind": "eval", "step": 0, "acc": 0.9}]
    )  # the last one: an unfinished run, left out
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = report.summarise(*report.load(out))
    code = {r["method"]: r for r in summary["code"]}
    assert code["sdpo"]["seeds"] == [0, 1, 2]
    assert code["grpo"]["final_mean"] == pytest.approx(0.6)
    assert code["grpo"]["final_sd"] == pytest.approx(0.1)
    assert code["sdpo"]["final_mean"] == pytest.approx(0.5)
    assert (code["sdpo"]["final_min"], code["sdpo"]["final_max"]) == (0.4, 0.6)
    assert code["sdpo"]["per_seed"][1] == (0.25, 0.5)
    lines = dict(zip(summary, report.verdicts(summary), strict=True))
    assert "**below**" in lines["code"] and "-10.0 points" in lines["code"]
    assert "above" in lines["addition"] and "+62.5 points" in lines["addition"]
    table = report.table(summary)
    assert "s0: 25.0 -> 50.0; s1: 25.0 -> 70.0; s2: 25.0 -> 60.0" in table
    assert "**60.0** ± 10.0" in table


@pytest.mark.parametrize(
    ("records", "task"), [("split2.jsonl", "count_bits"), ("split3.jsonl", "basic_arithmetic")], ids=str
)
def test_the_notes_quote_the_distinct_split_runs_as_their_report_prints_them(tmp_path, records, task):
    """docs/panel/notes.md quotes the gym runs on the split that keeps held-out questions out of training
    (docs/panel/split*.jsonl): every table row and verdict line the report prints for them is in the notes, and
    the README quotes the three means."""
    proc = _learning("--report-only", "--out", str(ROOT / "docs" / "panel" / records), cwd=tmp_path)
    lines = [line for line in proc.stdout.splitlines() if line.startswith((f"| {task} |", f"- {task} "))]
    assert len(lines) == 4  # three methods and a verdict
    notes = (ROOT / "docs" / "panel" / "notes.md").read_text()
    for line in lines:
        assert line in notes, line
    means = {row.split(" | ")[1]: row.split("**")[1] for row in lines if row.startswith("|")}
    readme = " ".join((ROOT / "README.md").read_text().split())
    quoted = f"{task}: pure SDPO {means['SDPO']}%, GRPO {means['GRPO']}%, the default {means['per-group hybrid w=1']}%"
    assert quoted in readme, quoted
