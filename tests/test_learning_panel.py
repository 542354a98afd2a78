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


def test_only_a_methods_name_sets_the_kl_anchor():
    """The panel starts from the demo's settings, whose loss is train()'s default (with distill_anchor): `sdpo` and
    `pg` must still run without the anchor, and `pg~anchor=0.1` with it."""
    import learning

    s = learning.settings(learning.parse_args(["--tasks", "addition"]))
    from sdpo_unsloth.tasks.addition import DEMO_SETTINGS

    assert DEMO_SETTINGS.distill_anchor > 0  # what the panel must not inherit
    assert learning.settings_of("sdpo", s)["distill_anchor"] == 0.0
    assert learning.settings_of("pg", s)["distill_anchor"] == 0.0
    assert learning.settings_of("pg~anchor=0.1", s)["distill_anchor"] == 0.1
    assert report.default_method() == "pg~anchor=0.1"  # train()'s default is run under its own name


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


def test_the_readme_verdict_names_each_seeds_gap_to_the_baseline_the_target_binds(tmp_path):
    records = (
        _records("code", "grpo", [0.5, 0.6])
        + _records("code", "sdpo", [0.7, 0.8])
        + _records("code", report.default_method(), [0.6, 0.85])
        + _records("addition", "grpo", [0.5, 0.5])
        + _records("addition", "sdpo", [0.25, 0.25])
        + _records("addition", report.default_method(), [0.25, 0.75])
    )
    out = tmp_path / "runs.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    block = report.readme_block(report.summarise(*report.load(out)))
    # code: pure SDPO beat GRPO, so it binds (0.6 - 0.7, 0.85 - 0.8); addition: met (0.5 >= GRPO's 0.5)
    assert "the default minus pure SDPO per seed -10.0/+5.0 points" in block
    assert "Met on addition" in block


def test_split_unchanged_tells_which_earlier_split_runs_still_hold_out_what_train_holds_out():
    """Runs recorded before held-out questions were kept out of training count only for tasks whose split did not
    change: addition (100 distinct problems) and code (40 distinct tasks) yes; count_bits up to 16 (16 distinct
    questions in 100 rows) and the panel's basic_arithmetic (repeated questions) no."""
    pytest.importorskip("reasoning_gym")
    from learning_tasks import split_unchanged

    assert split_unchanged("addition", 32) and split_unchanged("code", 20)
    assert not split_unchanged("gym:count_bits?max_n=16", 32)
    basic = 'gym:basic_arithmetic?min_terms=2&max_terms=2&max_digits=1&operators=["+","-"]&allow_parentheses=false&allow_negation=false'
    assert not split_unchanged(basic, 32)


def test_a_report_over_several_files_keeps_only_runs_on_the_distinct_split(tmp_path):
    """Several files, comma-separated: a file on the earlier split (no "split" key) keeps the tasks whose split did
    not change, and its command lines are narrowed to them and pointed at a new file; a distinct-split file counts
    whole."""
    pytest.importorskip("reasoning_gym")
    bits = "gym:count_bits?max_n=16"
    earlier = [{"kind": "command", "argv": ["--tasks", f"addition,{bits}", "--out", "/x/panel.jsonl"]}]
    earlier += [
        {**r, "held": 32} for r in _records("addition", "grpo", [0.5]) + _records(bits, "grpo", [0.9])
    ]
    earlier.append({"kind": "constant", "task": bits, "acc": 0.5, "answer": "2"})
    distinct = [{**r, "held": 32, "split": "distinct"} for r in _records("code", "sdpo", [0.6])]
    first, second = tmp_path / "panel.jsonl", tmp_path / "split2.jsonl"
    first.write_text("".join(json.dumps(r) + "\n" for r in earlier))
    second.write_text("".join(json.dumps(r) + "\n" for r in distinct))
    both = f"{first},{second}"
    curves, _ = report.load(both)
    assert sorted(curves) == [("addition", "grpo", 0), ("code", "sdpo", 0)]
    assert report.constants(both) == {}
    assert report.commands(both) == [["--tasks", "addition", "--out", str(tmp_path / "panel-rerun.jsonl")]]
    assert sorted(report.load(second)[0]) == [("code", "sdpo", 0)]


def test_runs_are_not_added_to_a_file_on_the_earlier_split_nor_to_several(tmp_path):
    """New runs on the distinct split would sit beside runs they cannot be compared with: learning.py refuses, as it
    refuses to train into several files at once."""
    import learning

    earlier = tmp_path / "panel.jsonl"
    earlier.write_text(
        "".join(json.dumps({**r, "held": 32}) + "\n" for r in _records("addition", "grpo", [0.5]))
    )
    with pytest.raises(SystemExit, match="earlier held-out split"):
        learning.main(["--tasks", "addition", "--out", str(earlier)])
    with pytest.raises(SystemExit, match="one file"):
        learning.main(["--tasks", "addition", "--out", f"{earlier},{tmp_path / 'b.jsonl'}"])
    assert len(earlier.read_text().splitlines()) == 3  # nothing written


def test_gym_runs_scored_with_substring_credit_are_reported_apart(tmp_path):
    """GymReward scores a number as right or wrong now; a gym run recorded before (no "gym_scoring") is not in the
    panel's tables, commands or constants but in its own history, and learning.py adds no runs to its file."""
    import learning

    bits = "gym:count_bits?max_n=255"
    old = [{"kind": "command", "argv": ["--tasks", f"addition,{bits}", "--out", "/x/split2.jsonl"]}]
    old += [{**r, "held": 32, "split": "distinct"} for r in _records("addition", "grpo", [0.5])]
    old += [{**r, "held": 32, "split": "distinct"} for r in _records(bits, "grpo", [0.9])]
    old.append({"kind": "constant", "task": bits, "held": 32, "acc": 0.5, "answer": "2"})
    new = [{"kind": "command", "argv": ["--tasks", bits, "--out", "/x/exact.jsonl"]}]
    new += [
        {**r, "held": 32, "split": "distinct", "gym_scoring": "exact numbers"}
        for r in _records(bits, "sdpo", [0.3])
    ]
    new.append({"kind": "constant", "task": bits, "held": 32, "acc": 0.25, "answer": "3"})
    first, second = tmp_path / "split2.jsonl", tmp_path / "exact.jsonl"
    first.write_text("".join(json.dumps(r) + "\n" for r in old))
    second.write_text("".join(json.dumps(r) + "\n" for r in new))
    both = f"{first},{second}"
    assert sorted(report.load(both)[0]) == [("addition", "grpo", 0), (bits, "sdpo", 0)]
    assert report.constants(both) == {bits: (0.25, "3")}
    assert report.commands(both) == [
        ["--tasks", "addition", "--out", str(tmp_path / "split2-rerun.jsonl")],
        ["--tasks", bits, "--out", str(second)],  # where the records are, not where they were written
    ]
    assert sorted(report.load(both, "lenient")[0]) == [(bits, "grpo", 0)]
    history = report.lenient_history(both)
    assert "count_bits" in history and "90.0" in history and "30.0" not in history
    assert report.lenient_history(str(second)) == ""
    assert report.lenient_tasks(both) == [bits]
    alone = report.readme_block(
        report.summarise(*report.load(str(first))), lenient=report.lenient_tasks(str(first))
    )
    assert "Not yet measured with numbers scored right or wrong: count_bits" in alone
    assert "Not yet measured" not in report.readme_block(report.summarise(*report.load(both)), lenient=[bits])
    with pytest.raises(SystemExit, match="substring credit"):
        learning.main(["--tasks", "addition", "--out", str(first)])
    assert len(first.read_text().splitlines()) == len(old)  # nothing written
