"""Learning panel: GRPO vs SDPO (and the hybrid) per task, the same settings everywhere, held-out greedy score.

For every task the same split, completion budget, prompts and generations per step, steps, LoRA and
optimizer; only the loss differs between methods (`SDPOConfig(enabled=False)` = GRPO on the same
trainer). Tasks (`--tasks`, see `learning_tasks.py`): ``addition`` (the demo), ``code`` (sandboxed Python
tasks, per-test feedback) and ``gym:<task>?key=value&...`` (reasoning-gym). The held-out score (greedy,
the task's own reward: accuracy, or for code the mean fraction of tests passed) is measured at step 0
and every `--eval-every` steps by a TrainerCallback. One JSON line per evaluation and per finished run
goes to `--out` (appended, flushed), so a time-out loses nothing; a rerun with the same `--out` skips
finished runs. Runs go seed by seed: every task gets seed 0 of every method first.

CPU (embedded SmolLM2-135M-Instruct; DEMO_SETTINGS unless a flag overrides it, for every task):

    OMP_NUM_THREADS=1 python benchmarks/learning.py --start-only --max-completion-length 64 \
        --tasks addition,code,gym:chain_sum?max_terms=2 --out /tmp/start.jsonl      # screen tasks
    OMP_NUM_THREADS=1 python benchmarks/learning.py --tasks addition,code --methods grpo,sdpo \
        --seeds 0,1,2 --max-steps 20 --eval-every 10 --max-completion-length 64 --out /tmp/panel.jsonl
    python benchmarks/learning.py --report-only --out /tmp/panel.jsonl --start /tmp/start.jsonl --write

Methods: `grpo`, `sdpo`, `hybridW` (SDPOConfig(grpo_weight=W)), `pgW` (the same with hybrid_mode="per_group",
W defaults to 1: GRPO in groups whose rewards differ, SDPO in the others), `fgW` (hybrid_mode="failed_groups":
the same, but an all-successful group is not distilled), `failW` (hybrid_mode="failures", W
defaults to 1: W x GRPO on every sample + SDPO on the failed ones); `grpo@LR` / `sdpo@LR` override lr;
`sdpo+self` (any SDPO method) shows a success its own completion as the demonstration; `pgrare`, `spread`,
`pgtrunc`, `adv`, `veto` and `gate` are experiments on the per-group hybrid (rare_success_weights,
spread_weights, truncated_rows_distilled, advantage_weights, teacher_veto, batch_gate_weights), patched into the trainer for their own runs. A suffix `~alpha=A`, `~ema=R` (the
teacher's update rate) or `~topk=K|full` overrides that SDPO setting for the run (e.g. `pg~alpha=1`), and
`~scale=group|batch|none` TRL's advantage scaling (GRPOConfig.scale_rewards).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
PLOT = ROOT / "docs" / "learning_curves.png"
sys.path.insert(0, str(Path(__file__).resolve().parent))

import learning_report as report  # noqa: E402
from common import LEARNING_RUN, write_section  # noqa: E402
from learning_tasks import (  # noqa: E402
    PanelTask,
    constant_baseline,
    echo_share,
    load_task,
    score,
    split_tasks,
    top_share,
)

README = ROOT / "README.md"  # its panel table: write_section("panel-evidence", ..., doc=README)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="addition", help="comma list: addition, code, gym:<task>?k=v&...")
    p.add_argument("--methods", default="grpo,sdpo", help="comma list: grpo, sdpo, hybridW, method@lr")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument(
        "--out",
        default="/tmp/learning.jsonl",
        help="JSON lines, appended; --report-only: one or more, comma-separated",
    )
    p.add_argument("--model", default=None, help="default: DEMO_SETTINGS.model ('embedded')")
    p.add_argument("--4bit", dest="four_bit", action="store_true", help="load the base in 4 bit (QLoRA)")
    p.add_argument("--gpu", action="store_true", help="train on the GPU (default: CPU, fp32)")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--lr", type=float, help="default: DEMO_SETTINGS.learning_rate, for every method")
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--num-generations", type=int, help="default: DEMO_SETTINGS (4)")
    p.add_argument("--batch", type=int, help="completions per step; default: DEMO_SETTINGS (8)")
    p.add_argument("--max-completion-length", type=int, help="one budget for every task; default: 8")
    p.add_argument("--held-size", type=int, help="held-out rows per task (at most half the task's rows)")
    p.add_argument("--start-only", action="store_true", help="only score the untrained model per task")
    p.add_argument("--report-only", action="store_true", help="no training: summarise --out")
    p.add_argument("--start", help="JSON lines of a --start-only screen, tabled in the doc section")
    p.add_argument("--write", action="store_true", help="write docs/benchmarks.md section + the plot")
    p.add_argument("--notes", help="a markdown file of findings to put into the section (with --write)")
    return p.parse_args(argv)


def settings(args: argparse.Namespace) -> dict:
    from sdpo_unsloth.tasks.addition import DEMO_SETTINGS

    s = dict(DEMO_SETTINGS)
    # The demo's loss (train()'s default) is a panel method of its own, e.g. `pg~anchor=0.1`: each method's name
    # alone sets the hybrid and the anchor (`method_spec`, `~anchor=A`), so `sdpo` and `pg` stay unanchored.
    for name in ("grpo_weight", "hybrid_mode"):
        s.pop(name, None)
    s["distill_anchor"] = 0.0
    for name, value in (
        ("model", args.model),
        ("max_steps", args.max_steps),
        ("learning_rate", args.lr),
        ("num_generations", args.num_generations),
        ("per_device_train_batch_size", args.batch),
        ("max_completion_length", args.max_completion_length),
        ("held_size", args.held_size),
    ):
        if value:
            s[name] = value
    s.update(load_in_4bit=args.four_bit, gpu=args.gpu, eval_every=args.eval_every)
    return s


def method_spec(method: str, s: dict) -> tuple[float, float | None, str, bool]:
    """(learning rate, grpo_weight, hybrid_mode, own success as demonstration); grpo_weight None = plain GRPO.

    `NAME+self` shows a successful sample its own completion as the demonstration
    (`dont_reprompt_on_self_success=False`); `NAME@LR` overrides the learning rate; `~alpha=A`, `~ema=R`,
    `~topk=K|full` override an SDPO setting, `~scale=group|batch|none` GRPOConfig.scale_rewards, `~reveal=0` keeps
    the expected answer out of a gym task's feedback (GymReward.reveal_answer), `~teacher=M` SDPOConfig.teacher_mode,
    `~sampled=1` SDPOConfig.sampled_token, `~beta=B` GRPOConfig.beta, `~anchor=A` SDPOConfig.distill_anchor
    (`settings_of`)."""
    name, _, lr = report.knobs(method)[0].partition("@")
    lr_value = float(lr) if lr else s["learning_rate"]
    name, plus, flag = name.partition("+")
    if plus and flag != "self":
        raise SystemExit(f"unknown method option {'+' + flag!r} in {method!r}: the one option is +self")
    own = flag == "self"
    if name == "grpo" and not own:
        return lr_value, None, "fixed", own
    if name == "sdpo":
        return lr_value, 0.0, "fixed", own
    if name.startswith("hybrid"):
        return lr_value, float(name[len("hybrid") :] or 0.9), "fixed", own
    if name in (
        "pgrare",
        "spread",
        "pgtrunc",
        "adv",
        "veto",
        "gate",
    ):  # experiments on the per-group hybrid, patched in by run_one
        return lr_value, 1.0, "per_group", own
    if name.startswith("pg"):
        return lr_value, float(name[len("pg") :] or 1.0), "per_group", own
    if name.startswith("fg"):
        return lr_value, float(name[len("fg") :] or 1.0), "failed_groups", own
    if name.startswith("fail"):
        return lr_value, float(name[len("fail") :] or 1.0), "failures", own
    raise SystemExit(
        f"unknown method {method!r}: use grpo, sdpo, hybridW, pgW, fgW, failW, the experiments pgrare, spread, pgtrunc, adv, veto and gate, optionally +self (SDPO methods) and @lr"
    )


def settings_of(method: str, s: dict) -> dict:
    """The panel settings `s` with the method's `~name=value` overrides (`report.KNOBS`) applied."""
    s = dict(s)
    for name, value in report.knobs(method)[1].items():
        setting = report.KNOBS[name]
        if setting in ("scale_rewards", "teacher_mode"):
            s[setting] = value
            continue
        if setting in ("reveal_answer", "sampled_token"):
            s[setting] = value not in ("0", "false", "no")
            continue
        s[setting] = (
            None if value == "full" else int(value) if setting == "distillation_topk" else float(value)
        )
    return s


def spread_weights(rewards, group_size, *, weight, mode, success_threshold=1.0):
    """Experiment `spread` (patched into the trainer for that run only): the per-group hybrid with a group's GRPO
    weight scaled by the share of the success threshold its rewards span, min(1, (max - min) / threshold).
    TRL divides a group's advantages by their std, so a group that differs only by partial credit (0.01 for a
    wrong but well-formed answer, 0 for a truncated one) gets GRPO's full push toward the crumb; here it is
    distilled instead, in proportion. Not an SDPOConfig option (ruled out on count_bits, docs/panel/notes.md)."""
    from sdpo_unsloth.steps import hybrid_weights

    grpo, _ = hybrid_weights(
        rewards, group_size, weight=weight, mode=mode, success_threshold=success_threshold
    )
    for start in range(0, len(rewards), group_size):
        scores = [r for r in rewards[start : start + group_size] if math.isfinite(r)]
        spread = max(scores) - min(scores) if len(scores) > 1 else 0.0
        grpo[start : start + group_size] = [weight * min(1.0, spread / success_threshold)] * group_size
    return grpo, [1.0 - g for g in grpo]


def rare_success_weights(rewards, group_size, *, weight, mode, success_threshold=1.0):
    """Experiment `pgrare` (patched into the trainer for that run only): the per-group hybrid, except that a
    group whose successes are fewer than half of it is distilled (0, 1) like an all-failed group: a rare success
    teaches its failed siblings (pure SDPO's gain where few samples succeed), common successes give GRPO a
    contrast. Not an SDPOConfig option."""
    from sdpo_unsloth.steps import hybrid_weights

    grpo, distill = hybrid_weights(
        rewards, group_size, weight=weight, mode=mode, success_threshold=success_threshold
    )
    for start in range(0, len(rewards), group_size):
        wins = sum(r >= success_threshold for r in rewards[start : start + group_size])
        if 2 * wins < group_size:
            grpo[start : start + group_size] = [0.0] * group_size
            distill[start : start + group_size] = [1.0] * group_size
    return grpo, distill


def advantage_weights(rewards, group_size, *, weight, mode, success_threshold=1.0):
    """Experiment `adv` (patched into the trainer for that run only): in a group whose rewards differ, GRPO on the
    samples above the group's mean reward (w, 0) and distillation on the others (0, 1), so no sample is pushed
    down by a negative advantage; groups of equal rewards (0, 1), as the per-group hybrid.

    >>> advantage_weights([1.0, 0.0, 0.0, 0.0, 0.5, 0.5], 2, weight=1.0, mode="per_group")
    ([1.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    """
    grpo, distill = [], []
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        scores = [r for r in group if math.isfinite(r)]
        mean = sum(scores) / len(scores) if len(scores) > 1 and max(scores) > min(scores) else math.inf
        above = [math.isfinite(r) and r > mean for r in group]
        grpo += [weight if a else 0.0 for a in above]
        distill += [0.0 if a else 1.0 for a in above]
    return grpo, distill


def batch_gate_weights(rewards, group_size, *, weight, mode, success_threshold=1.0):
    """Experiment `gate` (patched into the trainer for that run only): the per-group hybrid while fewer than half
    of the generation batch's prompt groups have a success; from half on, GRPO alone (no sample distilled), since
    GRPO then has a contrast in most groups and distilling the rest is what lowered gcd.

    >>> batch_gate_weights([1.0, 0.0, 0.0, 0.0], 2, weight=1.0, mode="per_group")
    ([1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0])
    >>> batch_gate_weights([1.0, 0.0, 0.0, 0.0, 0.0, 0.0], 2, weight=1.0, mode="per_group")
    ([1.0, 1.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    """
    from sdpo_unsloth.steps import hybrid_weights

    grpo, distill = hybrid_weights(
        rewards, group_size, weight=weight, mode=mode, success_threshold=success_threshold
    )
    groups = [rewards[i : i + group_size] for i in range(0, len(rewards), group_size)]
    won = sum(any(r >= success_threshold for r in g) for g in groups)
    if 2 * won >= len(groups):
        distill = [0.0] * len(rewards)
    return grpo, distill


EXPERIMENTS = {
    "gate": batch_gate_weights,
    "pgrare": rare_success_weights,
    "spread": spread_weights,
    "adv": advantage_weights,
}  # family -> trainer.hybrid_weights
_ORIGINAL: dict = {}  # the trainer's own methods, restored for runs that are not an experiment


def truncated_rows_distilled(generate):
    """Experiment `pgtrunc` (wraps the trainer's `_generate_and_score_completions` for that run only): the
    per-group hybrid, but a completion cut at the token budget gets no GRPO term and full distillation (GRPO
    would push every token of a reasoning that ran out of budget down: brevity, not correctness). Not an
    SDPOConfig option (ruled out on count_bits, docs/panel/notes.md)."""

    def wrapped(self, inputs):
        output = generate(self, inputs)
        eos = {*self.eos_token_ids, self._tokenizer.pad_token_id}
        for i, (row, length) in enumerate(
            zip(output["completion_ids"].tolist(), output["completion_mask"].sum(dim=1).tolist(), strict=True)
        ):
            if length >= self.max_completion_length and row[length - 1] not in eos:
                output["sdpo_grpo_weight"][i], output["sdpo_distill_weight"][i] = 0.0, 1.0
        return output

    return wrapped


def teacher_veto(distill):
    """Experiment `veto` (wraps `sdpo_unsloth.loss.chunked_distill` for that run only): the per-group hybrid,
    but the distillation of a sampled token is dropped where the teacher gives it more probability than the
    student does. Under the per-group hybrid at weight 1 every distilled sample failed, so the teacher may push a
    failed completion's tokens down and reshape the others, never raise what the verifier rejected (on gcd the
    students drift towards answering with a number of the question, which the teacher reading the question
    again prefers). In sampled-token mode (`~sampled=1~alpha=1`) the teacher's log-probability is capped at the
    student's: only the tokens it rates lower are pushed, down. Not an SDPOConfig option."""

    def wrapped(*args, **kwargs):
        import dataclasses

        import torch

        terms = distill(*args, **kwargs)
        student = terms.student_logp.detach()
        endorsed = terms.teacher_logp > student
        divergence = terms.divergence
        if divergence is not None:
            divergence = divergence * (~endorsed).to(divergence.dtype)
        return dataclasses.replace(
            terms, divergence=divergence, teacher_logp=torch.minimum(terms.teacher_logp, student)
        )

    return wrapped


def emit(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
    print(json.dumps(record), flush=True)


def _load(s: dict, seed: int, teacher: bool):
    from sdpo_unsloth.model import load_model

    return load_model(
        s["model"],
        load_in_4bit=s["load_in_4bit"],
        lora_r=s["lora_r"],
        gradient_checkpointing=False,
        teacher_adapter="sdpo_teacher" if teacher else None,
        seed=seed,
    )


def shares(task: PanelTask, graded: list) -> dict:
    """An evaluation's `top_share` (the most common completion's share of the rows) and, for a task with answers,
    `echo_share` (the rows answered with a number of their own question)."""
    echo = echo_share(task, graded)
    return {"top_share": top_share(graded), **({"echo_share": echo} if echo is not None else {})}


def record_constant(task: PanelTask, out: str) -> None:
    """Append the task's constant-answer baseline to `out` unless it is there (no model: the task's reward alone)."""
    if report.constant_score(out, task.name) is None and (constant := constant_baseline(task)) is not None:
        emit(
            out,
            {
                "kind": "constant",
                "task": task.name,
                "held": len(task.held),
                "acc": constant[0],
                "answer": constant[1],
            },
        )


def gym_scoring(task: str) -> dict[str, str]:
    """A gym task's records say that a number was right or wrong (`GymReward`); earlier runs have no such key:
    the task's default verifier gave partial credit for an answer containing the expected one."""
    return {"gym_scoring": "exact numbers"} if task.startswith("gym:") else {}


def start_only(s: dict, tasks: list[str], out: str) -> None:
    """Score the untrained model on every task's held-out rows (one model load)."""
    model, tokenizer = _load(s, 0, teacher=False)
    for name in tasks:
        task = load_task(name, s["held_size"])
        record_constant(task, out)
        t0 = time.perf_counter()
        acc = score(model, tokenizer, task, s["max_completion_length"])
        emit(
            out,
            {
                "kind": "start",
                "task": name,
                "held": len(task.held),
                "max_completion_length": s["max_completion_length"],
                "acc": acc,
                "split": "distinct",
                **gym_scoring(name),
                "eval_s": round(time.perf_counter() - t0, 1),
            },
        )


LOGGED = (
    "step",
    "reward",
    "reward_std",
    "frac_reward_zero_std",
    "completions/mean_length",
    "completions/clipped_ratio",
)
"""Per-step training logs kept in a run's "log" record, with SDPO's `sdpo/frac_*` shares (which rows were
distilled, had a demonstration or feedback)."""


def run_one(s: dict, task: PanelTask, method: str, seed: int, out: str) -> None:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig

    import sdpo_unsloth.steps
    import sdpo_unsloth.trainer
    from sdpo_unsloth import SDPOConfig, SDPOTrainer
    from sdpo_unsloth.bootstrap import bf16_supported

    if not s["gpu"]:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    s = settings_of(method, s)
    lr, grpo_weight, hybrid_mode, own_success = method_spec(method, s)
    # Set for every run, not only the experiments': the runs of one process share the trainer module.
    mixin = sdpo_unsloth.trainer._SDPOMixin
    generate = _ORIGINAL.setdefault("generate", mixin.__dict__["_generate_and_score_completions"])
    mixin._generate_and_score_completions = (
        truncated_rows_distilled(generate) if report.family(method) == "pgtrunc" else generate
    )
    loss_module = sdpo_unsloth.trainer.sdpo_loss
    distill = _ORIGINAL.setdefault("distill", loss_module.chunked_distill)
    loss_module.chunked_distill = teacher_veto(distill) if report.family(method) == "veto" else distill
    sdpo_unsloth.trainer.hybrid_weights = EXPERIMENTS.get(
        report.family(method), sdpo_unsloth.steps.hybrid_weights
    )
    grpo = grpo_weight is None
    key = {
        "task": task.name,
        "method": method,
        "seed": seed,
        "lr": lr,
        "model": s["model"],
        "max_steps": s["max_steps"],
        "max_completion_length": s["max_completion_length"],
        "held": len(task.held),
        "train": len(task.train),
        "temperature": s["temperature"],
        "sdpo_alpha": s["alpha"],
        "teacher_update_rate": s["teacher_update_rate"],
        **{  # the other overrides, under their setting's name (alpha and ema: the two keys above)
            report.KNOBS[k]: s[report.KNOBS[k]] for k in report.knobs(method)[1] if k not in ("alpha", "ema")
        },
        "split": "distinct",  # held-out questions kept out of training (earlier runs: no key)
        **gym_scoring(task.name),
    }
    t0 = time.perf_counter()
    if "reveal_answer" in s:
        if not hasattr(task.reward, "reveal_answer"):
            raise SystemExit(
                f"~reveal= needs a reasoning-gym task (GymReward); {task.name} has {task.reward!r}"
            )
        task.reward.reveal_answer = s["reveal_answer"]
    model, tokenizer = _load(s, seed, teacher=not grpo)
    budget = s["max_completion_length"]
    record_constant(task, out)
    before = report.untrained_score(out, key)  # LoRA B starts at 0: step 0 is the same model for every run
    if before is None:
        graded: list = []
        acc = score(model, tokenizer, task, budget, graded)
        emit(out, {**key, "kind": "eval", "step": 0, "acc": acc, "t": 0.0, **shares(task, graded)})
    else:
        emit(out, {**key, "kind": "eval", "step": 0, "acc": before, "t": 0.0, "reused": True})
    sdpo = (
        SDPOConfig(enabled=False)
        if grpo
        else SDPOConfig(
            alpha=s["alpha"],
            distillation_topk=s["distillation_topk"],
            teacher_mode=s["teacher_mode"],
            teacher_update_rate=s["teacher_update_rate"],
            grpo_weight=grpo_weight,
            hybrid_mode=hybrid_mode,
            dont_reprompt_on_self_success=not own_success,
            sampled_token=s.get("sampled_token", False),
            distill_anchor=s.get("distill_anchor", 0.0),
        )
    )
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="learning_"),
        max_steps=s["max_steps"],
        learning_rate=lr,
        num_generations=s["num_generations"],
        per_device_train_batch_size=s["per_device_train_batch_size"],
        gradient_accumulation_steps=s["gradient_accumulation_steps"],
        temperature=s["temperature"],
        max_completion_length=budget,
        gradient_checkpointing=False,
        use_cpu=not s["gpu"],
        bf16=s["gpu"] and bf16_supported(),
        fp16=s["gpu"] and not bf16_supported(),
        report_to=[],
        save_strategy="no",
        **LEARNING_RUN,
        **({"scale_rewards": s["scale_rewards"]} if "scale_rewards" in s else {}),
        **({"beta": s["beta"]} if "beta" in s else {}),
        seed=seed,
        data_seed=seed,
    )
    trainer = SDPOTrainer(
        model=model,
        args=args,
        sdpo_config=sdpo,
        processing_class=tokenizer,
        reward_funcs=[task.reward],
        train_dataset=Dataset.from_list(task.train),
    )
    trainer.remove_callback(PrinterCallback)
    t_train = time.perf_counter()
    eval_time = [0.0]

    class _Eval(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            step = state.global_step
            if step % s["eval_every"] == 0 or step == s["max_steps"]:
                e0 = time.perf_counter()
                graded: list = []
                acc = score(trainer.model, tokenizer, task, budget, graded)
                eval_time[0] += time.perf_counter() - e0
                t = round(time.perf_counter() - t_train - eval_time[0], 1)
                emit(
                    out,
                    {**key, "kind": "eval", "step": step, "acc": acc, "t": t, **shares(task, graded)},
                )

    trainer.add_callback(_Eval())
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    steps = [
        {k: v for k, v in h.items() if k in LOGGED or k.startswith("sdpo/frac")}
        for h in trainer.state.log_history
        if "reward" in h
    ]
    emit(out, {**key, "kind": "log", "steps": steps})  # what each step trained on (report.load skips it)
    train_s = time.perf_counter() - t_train - eval_time[0]
    emit(
        out,
        {
            **key,
            "kind": "done",
            "train_reward": sum(rewards) / max(len(rewards), 1),
            "train_s": round(train_s, 1),
            "s_per_step": round(train_s / s["max_steps"], 2),
            "total_s": round(time.perf_counter() - t0, 1),
        },
    )


EARLIER = """
### The earlier split, as recorded

Runs recorded before `_split` kept held-out questions out of training. The tables above keep those whose split
that change left the same rows (`learning_tasks.split_unchanged`); here are all of them, on their own footing
(see the notes).

{history}
"""


LENIENT = """
### Gym tasks scored with substring credit, as recorded

Runs recorded before `GymReward` scored numbers as right or wrong: the task's default verifier gave an answer
containing the expected number len(expected) / len(answer) ("14" for 4: 0.5), in training and in the held-out
score. The tables above hold only runs scored the new way; here are the earlier ones, on their own footing.

{lenient}
"""


def section(
    summary: dict,
    meta: dict,
    starts: list[dict],
    notes: str,
    command: str,
    shares: str,
    history: str = "",
    lenient: str = "",
) -> str:
    from sdpo_unsloth.tasks.addition import DEMO_SETTINGS

    d = dict(DEMO_SETTINGS)
    m = next(iter(meta.values()))
    screen = report.start_table(starts) if starts else "(no --start file given)"
    tasks = ", ".join(f"`{t}`" for t in summary)
    return f"""## Learning panel: GRPO vs SDPO per task, the same settings everywhere (measured {time.strftime("%Y-%m-%d")})

**Measured** on CPU (2 cores shared with other jobs, `OMP_NUM_THREADS=1`, fp32), embedded SmolLM2-135M-Instruct,
tasks {tasks}. One setting for every task and method: {m["max_steps"]} optimizer steps,
{d["per_device_train_batch_size"] // d["num_generations"]} prompts x {d["num_generations"]} generations per step,
temperature {d["temperature"]:g}, **completion budget {m["max_completion_length"]} tokens for every task** (a code answer, a
```` ```python ```` block with a `def`, does not fit in the addition demo's 8 tokens, so every task gets the code
task's budget), lr {d["learning_rate"]:g},
LoRA r={d["lora_r"]}, AdamW wd 0.01, grad clip 1.0; SDPO = `DEMO_SETTINGS` (alpha {d["alpha"]:g}, top-K
{d["distillation_topk"]} + tail, {d["teacher_mode"]} teacher {d["teacher_update_rate"]:g}); GRPO =
`SDPOConfig(enabled=False)` on the same `SDPOTrainer`. No per-task tuning. Rows per task: the library's own
`train(dataset=...)` resolution (100 rows, 40 for code), {m["held"]} held out (at most half the rows: 20 for
code) with a split that does not depend on the training seed; a training row that asks a held-out question is
dropped, so no held-out question is trained on. Score = mean held-out reward of greedy
completions under the task's own reward (addition: accuracy; reasoning-gym: `GymReward`, the task's verifier
with a number scored as right or wrong, so the accuracy for these tasks; code: the fraction of hidden tests
passed), at step 0 and every few steps. Spread = sample sd over seeds.

Starting scores of the candidate tasks (untrained model, `--start-only`):

{screen}

{report.table(summary)}

{chr(10).join(report.verdicts(summary))}

What the students say at the end (runs that recorded their greedy held-out completions; *one constant answer*:
the best score of the same completion, "The answer is X.", for every held-out row):

{shares}

![learning panel](learning_curves.png)

{notes.strip()}
{LENIENT.format(lenient=lenient) if lenient else ""}{EARLIER.format(history=history) if history else ""}
Reproduce (CPU; raw JSON lines: `docs/panel/`; reruns skip finished runs):

```
{command}
```
"""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tasks = split_tasks(args.tasks)
    if "," in args.out and not args.report_only:
        raise SystemExit(
            f"--out {args.out!r}: runs go to one file; several (comma-separated) only with --report-only"
        )
    if args.start_only:
        emit(args.out, {"kind": "command", "argv": sys.argv[1:] if argv is None else list(argv)})
        start_only(settings(args), tasks, args.out)
        return 0
    if not args.report_only:
        s = settings(args)
        recorded = report.records(args.out, "every")
        if report.lenient_gym(recorded):
            raise SystemExit(
                f"{args.out} holds gym runs scored with the verifier's substring credit (GymReward now scores a "
                "number as right or wrong): new runs are not comparable with them. Write them to a new file (--out)."
            )
        if report.earlier_split(recorded):
            raise SystemExit(
                f"{args.out} holds runs on the earlier held-out split, whose held-out gym questions were also in "
                "the training rows (sdpo_unsloth.data._split now keeps them apart): new runs are not comparable "
                "with them. Write them to a new file (--out)."
            )
        _, done = report.load(args.out)
        emit(args.out, {"kind": "command", "argv": sys.argv[1:] if argv is None else list(argv)})
        loaded: dict[str, PanelTask] = {}
        for seed in [int(x) for x in args.seeds.split(",")]:
            for name in tasks:
                for method in args.methods.split(","):
                    if (name, method, seed) in done:
                        print(f"skip {name} {method} seed {seed}: already in {args.out}", flush=True)
                        continue
                    if name not in loaded:
                        loaded[name] = load_task(name, s["held_size"])
                    run_one(s, loaded[name], method, seed, args.out)
    curves, meta = report.load(args.out)
    if not curves:
        print("no finished runs")
        return 1
    summary = report.summarise(curves, meta)
    print(report.table(summary))
    print("\n".join(report.verdicts(summary)))
    if args.write:
        m = next(iter(meta.values()))
        report.plot(
            curves,
            summary,
            PLOT,
            f"GRPO (blue), SDPO (red), per-group hybrid (orange), failed-groups hybrid (black), "
            f"GRPO + SDPO on failures (green), dash-dotted with a setting changed; train()'s default: "
            f"{report.HYBRID_NAMES[report.default_method()]}\n"
            f"SmolLM2-135M-Instruct, CPU, {m['max_steps']} steps, "
            f"{m['max_completion_length']}-token budget (thin: per seed, thick: mean)",
        )
        notes = Path(args.notes).read_text() if args.notes else ""
        lenient = report.lenient_summary(args.out)  # the substring-credit runs: their section and README note
        starts = report.starts(args.start) if args.start else []
        screens = report.commands(args.start) if args.start else []
        runs = [*screens, *report.commands(args.out), sys.argv[1:] if argv is None else list(argv)]
        command = "\n".join(
            "OMP_NUM_THREADS=1 python benchmarks/learning.py " + " ".join(shlex.quote(a) for a in run)
            for run in runs
        )
        write_section(
            "learning-panel",
            section(
                summary,
                meta,
                starts,
                notes,
                command,
                report.shares_table(args.out),
                report.history(args.out),
                report.lenient_history(args.out, lenient),
            ),
        )
        write_section(
            "panel-evidence",
            report.readme_block(
                summary, constants=report.constants(args.out), lenient=report.lenient_tasks(args.out, lenient)
            ),
            doc=README,
        )
        print(
            f"wrote {PLOT}, the 'learning-panel' section of docs/benchmarks.md and the README's panel table"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
