"""SDPO on 2 CPU processes (torch.distributed.run, gloo) equals SDPO on 1 with the same global batch.

Tolerance: weight updates agree to rtol 1e-4 of the update's scale (float32 sums in another order);
both ranks hold bit-identical student and teacher adapters.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).parent / "multiprocess" / "sdpo_worker.py"


def launch(out: Path, processes: int, *args: str) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", SDPO_UNSLOTH_BACKEND="transformers", HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    command += ["--master_port", str(29500 + os.getpid() % 1000), str(WORKER), str(out), *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(processes)]


def assert_close_updates(a: dict, b: dict, initial: dict | None = None) -> None:
    for key in ("student", "teacher"):
        scale = max(
            float((v - (initial or {}).get(n, torch.zeros_like(v))).abs().max()) for n, v in a[key].items()
        )
        for name, value in a[key].items():
            torch.testing.assert_close(value, b[key][name], rtol=1e-4, atol=1e-4 * max(scale, 1e-6))


def test_two_processes_equal_one_with_the_same_global_batch_and_resume(tmp_path):
    (one,) = launch(tmp_path / "one", 1, "--batch", "4", "--max-steps", "4")
    two = launch(tmp_path / "two", 2, "--batch", "2", "--max-steps", "4", "--save-steps", "2")
    for key in ("student", "teacher"):  # one teacher, one student: identical on every rank
        assert all(torch.equal(two[0][key][n], two[1][key][n]) for n in two[0][key])
    # The group spans the ranks: rank 1 holds positions 2-3 of each group, never a success itself, yet its
    # rows have a teacher (the demonstration generated on rank 0).
    assert bool((two[1]["lengths"] > 0).all())
    assert bool(two[1]["sample_mask"].bool().all())
    assert float(two[0]["sample_mask"].sum()) == 1.0  # the success itself has no other success to learn from
    assert_close_updates(one, two[0])
    losses_one = [e["loss"] for e in one["logs"] if "loss" in e]
    losses_two = [e["loss"] for e in two[0]["logs"] if "loss" in e]
    assert losses_two == pytest.approx(losses_one, rel=1e-3)

    resumed = launch(
        tmp_path / "two",
        2,
        "--batch",
        "2",
        "--max-steps",
        "4",
        "--resume",
        str(tmp_path / "two/run/checkpoint-2"),
    )
    for rank in range(2):
        assert_close_updates(two[rank], resumed[rank])


def test_two_processes_with_gradient_accumulation(tmp_path):
    (one,) = launch(tmp_path / "one", 1, "--batch", "2", "--accumulation", "2")
    two = launch(tmp_path / "two", 2, "--batch", "1", "--accumulation", "2")
    assert all(torch.equal(two[0]["student"][n], two[1]["student"][n]) for n in two[0]["student"])
    assert_close_updates(one, two[0])


def test_train_on_two_processes_evaluates_and_exports_once(tmp_path, tiny_model_dir):
    import json

    env = dict(os.environ, OMP_NUM_THREADS="1", SDPO_UNSLOTH_BACKEND="transformers", HF_HUB_OFFLINE="1")
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_port", str(29600 + os.getpid() % 1000), str(WORKER.parent / "train_worker.py")]
    done = subprocess.run(
        [*command, tiny_model_dir, str(out)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    main, other = (json.loads((out / f"result{r}.json").read_text()) for r in range(2))
    assert main["before"] is not None and main["after"] is not None and main["adapter_dir"]
    assert other == {"before": None, "after": None, "adapter_dir": None}
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    summary = json.loads((out / "train_result.json").read_text())
    assert summary["metrics"]["step"] == 2


def test_a_time_budget_stops_every_process_at_the_same_step(tmp_path):
    """The budget decision is or'ed over processes: no rank waits alone in a collective (a hang)."""
    out = tmp_path / "budget"
    # 400 steps take far longer than the 3 s budget (a step of this tiny run takes 0.1-0.3 s here).
    ranks = launch(out, 2, "--batch", "2", "--max-steps", "400", "--save-steps", "1000", "--time-budget", "3")
    steps = {rank["global_step"] for rank in ranks}
    assert len(steps) == 1 and 0 < steps.pop() < 400
    complete = [p for p in (out / "run").glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    assert len(complete) == 1 and (complete[0] / "sdpo_teacher.safetensors").is_file()
