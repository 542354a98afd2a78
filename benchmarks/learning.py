"""Learning curves: GRPO vs SDPO (and the hybrid) with the same budget, held-out greedy accuracy.

Same task, prompts, split, generations per step, steps, LoRA and optimizer for every method; only the
loss differs (`SDPOConfig(enabled=False)` = GRPO on the same trainer). Held-out greedy accuracy
(`sdpo_unsloth.tasks.addition.evaluate`, eval mode) is measured at step 0 and every `--eval-every`
steps by a TrainerCallback. One JSON line per evaluation and per finished run goes to `--out`
(appended, flushed), so a time-out loses nothing; a rerun with the same `--out` skips finished runs.

CPU (the defaults: embedded SmolLM2-135M-Instruct, one-digit addition, DEMO_SETTINGS):

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/learning.py --seeds 0,1,2 \
        --methods grpo,sdpo --out /tmp/learning.jsonl
    python benchmarks/learning.py --methods hybrid0.9,grpo@2e-3 --seeds 0 --out /tmp/learning.jsonl
    python benchmarks/learning.py --report-only --out /tmp/learning.jsonl --write   # table, plot, doc

GPU scale-up (see the section this writes into docs/benchmarks.md):

    python benchmarks/learning.py --model unsloth/Qwen2.5-0.5B-Instruct --4bit --gpu --digits 2 \
        --max-steps 200 --eval-every 20 --seeds 0,1,2,3,4 --lr 5e-5 --methods grpo,sdpo,hybrid0.9

Methods: `grpo`, `sdpo`, `hybridW` (SDPOConfig(grpo_weight=W)); `grpo@LR` / `sdpo@LR` override lr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
PLOT = ROOT / "docs" / "learning_curves.png"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="grpo,sdpo", help="comma list: grpo, sdpo, hybridW, method@lr")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default="/tmp/learning.jsonl", help="JSON lines, appended")
    p.add_argument("--model", default=None, help="default: DEMO_SETTINGS.model ('embedded')")
    p.add_argument("--4bit", dest="four_bit", action="store_true", help="load the base in 4 bit (QLoRA)")
    p.add_argument("--gpu", action="store_true", help="train on the GPU (default: CPU, fp32)")
    p.add_argument("--digits", type=int, default=1, help="operand digits of the addition task")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--lr", type=float, help="default: DEMO_SETTINGS.learning_rate, for every method")
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--num-generations", type=int, help="default: DEMO_SETTINGS (4)")
    p.add_argument("--batch", type=int, help="completions per step; default: DEMO_SETTINGS (8)")
    p.add_argument("--max-completion-length", type=int, help="default: DEMO_SETTINGS (8)")
    p.add_argument("--held-size", type=int, help="held-out problems; default: DEMO_SETTINGS (32)")
    p.add_argument("--train-size", type=int, help="train problems; default: DEMO_SETTINGS (68)")
    p.add_argument("--report-only", action="store_true", help="no training: summarise --out")
    p.add_argument("--write", action="store_true", help="write docs/benchmarks.md section + the plot")
    p.add_argument("--compare", help="a second JSON-lines file, plotted as a second panel (with --write)")
    p.add_argument("--compare-title", default="previous settings")
    p.add_argument("--notes", help="a markdown file of findings to put into the section (with --write)")
    return p.parse_args(argv)


def settings(args: argparse.Namespace) -> dict:
    from sdpo_unsloth.tasks.addition import DEMO_SETTINGS

    s = dict(DEMO_SETTINGS)
    if args.model:
        s["model"] = args.model
    if args.max_steps:
        s["max_steps"] = args.max_steps
    if args.lr:
        s["learning_rate"] = args.lr
    for name, value in (
        ("num_generations", args.num_generations),
        ("per_device_train_batch_size", args.batch),
        ("max_completion_length", args.max_completion_length),
        ("held_size", args.held_size),
        ("train_size", args.train_size),
    ):
        if value:
            s[name] = value
    s["digits"] = args.digits
    s["load_in_4bit"] = args.four_bit
    s["gpu"] = args.gpu
    s["eval_every"] = args.eval_every
    return s


def method_spec(method: str, s: dict) -> tuple[float, float | None]:
    """(learning rate, grpo_weight); grpo_weight None = plain GRPO."""
    name, _, lr = method.partition("@")
    lr_value = float(lr) if lr else s["learning_rate"]
    if name == "grpo":
        return lr_value, None
    if name == "sdpo":
        return lr_value, 0.0
    if name.startswith("hybrid"):
        return lr_value, float(name[len("hybrid") :] or 0.9)
    raise SystemExit(f"unknown method {method!r}: use grpo, sdpo, hybridW, optionally @lr")


def emit(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
    print(json.dumps(record), flush=True)


def run_one(s: dict, method: str, seed: int, out: str) -> None:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig

    from sdpo_unsloth import SDPOConfig, SDPOTrainer
    from sdpo_unsloth.model import load_model
    from sdpo_unsloth.tasks.addition import AdditionReward, addition_dataset, evaluate

    if not s["gpu"]:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    lr, grpo_weight = method_spec(method, s)
    grpo = grpo_weight is None
    key = {
        "method": method,
        "seed": seed,
        "lr": lr,
        "model": s["model"],
        "digits": s["digits"],
        "max_steps": s["max_steps"],
        "temperature": s["temperature"],
        "sdpo_alpha": s["alpha"],
        "teacher_update_rate": s["teacher_update_rate"],
    }
    t0 = time.perf_counter()
    held = addition_dataset(s["held_size"], seed=s["held_seed"], digits=s["digits"])
    train_rows = addition_dataset(s["train_size"], seed=s["train_seed"], digits=s["digits"], exclude=held)
    model, tokenizer = load_model(
        s["model"],
        load_in_4bit=s["load_in_4bit"],
        lora_r=s["lora_r"],
        gradient_checkpointing=False,
        teacher_adapter=None if grpo else "sdpo_teacher",
        seed=seed,
    )
    emit(out, {**key, "kind": "eval", "step": 0, "acc": evaluate(model, tokenizer, held), "t": 0.0})
    sdpo = (
        SDPOConfig(enabled=False)
        if grpo
        else SDPOConfig(
            alpha=s["alpha"],
            distillation_topk=s["distillation_topk"],
            teacher_mode=s["teacher_mode"],
            teacher_update_rate=s["teacher_update_rate"],
            grpo_weight=grpo_weight,
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
        max_completion_length=s["max_completion_length"],
        gradient_checkpointing=False,
        use_cpu=not s["gpu"],
        bf16=s["gpu"] and torch.cuda.is_bf16_supported(),
        fp16=s["gpu"] and not torch.cuda.is_bf16_supported(),
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=seed,
        data_seed=seed,
        weight_decay=0.01,
        max_grad_norm=1.0,
    )
    trainer = SDPOTrainer(
        model=model,
        args=args,
        sdpo_config=sdpo,
        processing_class=tokenizer,
        reward_funcs=[AdditionReward()],
        train_dataset=Dataset.from_list(train_rows),
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    t_train = time.perf_counter()
    eval_time = [0.0]

    class _Eval(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            step = state.global_step
            if step % s["eval_every"] == 0 or step == s["max_steps"]:
                e0 = time.perf_counter()
                acc = evaluate(trainer.model, tokenizer, held)
                eval_time[0] += time.perf_counter() - e0
                emit(
                    out,
                    {
                        **key,
                        "kind": "eval",
                        "step": step,
                        "acc": acc,
                        "t": round(time.perf_counter() - t_train - eval_time[0], 1),
                    },
                )

    trainer.add_callback(_Eval())
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
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


def load(out: str) -> tuple[dict, dict]:
    """curves[(method, seed)] = {step: acc} for finished runs; meta[(method, seed)] = done record."""
    curves: dict = {}
    meta: dict = {}
    if not Path(out).exists():
        return curves, meta
    for line in Path(out).read_text().splitlines():
        r = json.loads(line)
        k = (r["method"], r["seed"])
        if r["kind"] == "eval":
            if r["step"] == 0:
                curves[k] = {}  # a restarted run replaces a partial one
            curves.setdefault(k, {})[r["step"]] = r["acc"]
        else:
            meta[k] = r
    return {k: v for k, v in curves.items() if k in meta}, meta


def label(method: str) -> str:
    name, _, lr = method.partition("@")
    if name.startswith("hybrid"):
        name = f"hybrid (grpo_weight={name[6:]})"
    return (
        name.upper() + (f" lr {lr}" if lr else "")
        if not name.startswith("hybrid")
        else name + (f" lr {lr}" if lr else "")
    )


def summarise(curves: dict, meta: dict, base_method: str = "grpo") -> tuple[list[dict], float | None]:
    order = {"grpo": 0, "sdpo": 1}
    methods = sorted(
        dict.fromkeys(m for m, _ in curves), key=lambda m: (order.get(m.partition("@")[0], 2), m)
    )
    finals = {m: [c[max(c)] for (mm, _), c in curves.items() if mm == m] for m in methods}
    # The bar: GRPO's final mean at its best learning rate among the GRPO rows run (the stricter bar).
    grpo_rows = [m for m in methods if m.partition("@")[0] == base_method]
    best = max(grpo_rows, key=lambda m: statistics.mean(finals[m]), default=None)
    target = statistics.mean(finals[best]) if best else None
    rows = []
    for m in methods:
        runs = {seed: c for (mm, seed), c in curves.items() if mm == m}
        steps = sorted(set.intersection(*(set(c) for c in runs.values())))
        mean_curve = {st: statistics.mean(c[st] for c in runs.values()) for st in steps}
        f = finals[m]

        def first(curve: dict) -> int | None:
            if target is None:
                return None
            return next((st for st in sorted(curve) if st > 0 and curve[st] >= target - 1e-9), None)

        rows.append(
            {
                "method": m,
                "lr": meta[next(k for k in meta if k[0] == m)]["lr"],
                "seeds": sorted(runs),
                "before": statistics.mean(c[0] for c in runs.values()),
                "final_mean": statistics.mean(f),
                "final_sd": statistics.stdev(f) if len(f) > 1 else 0.0,
                "final_min": min(f),
                "final_max": max(f),
                "per_seed": {seed: c[max(c)] for seed, c in sorted(runs.items())},
                "best_mean": max(v for st, v in mean_curve.items() if st > 0),
                "mean_curve": mean_curve,
                "steps_to_target_mean": first(mean_curve),
                "steps_to_target_seed": {seed: first(c) for seed, c in sorted(runs.items())},
                "max_steps": max(max(c) for c in runs.values()),
                "s_per_step": statistics.mean(meta[(m, seed)]["s_per_step"] for seed in runs),
                "is_target": m == best,
            }
        )
    return rows, target


COLORS = {"grpo": "tab:blue", "sdpo": "tab:red", "hybrid": "tab:purple"}


def _color(method: str) -> tuple[str, str]:
    name, _, lr = method.partition("@")
    color = COLORS["hybrid" if name.startswith("hybrid") else name]
    return color, (":" if lr else "-")


def plot(panels: list[tuple[dict, list[dict], float | None, str]], path: Path) -> None:
    """One panel per (curves, rows, target, title): thin lines per seed, thick the mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(7.0 * len(panels), 4.8), dpi=110, squeeze=False)
    for ax, (curves, rows, target, title) in zip(axes[0], panels, strict=False):
        for (m, _seed), c in sorted(curves.items()):
            xs = sorted(c)
            color, ls = _color(m)
            ax.plot(xs, [100 * c[x] for x in xs], color=color, ls=ls, alpha=0.3, lw=1, marker=".")
        for r in rows:
            xs = sorted(r["mean_curve"])
            color, ls = _color(r["method"])
            n = len(r["seeds"])
            ax.plot(
                xs,
                [100 * r["mean_curve"][x] for x in xs],
                color=color,
                ls=ls,
                lw=2.5,
                label=f"{label(r['method'].partition('@')[0])}, lr {r['lr']:g} (mean of {n} seed{'s' * (n > 1)})",
            )
        if target is not None:
            ax.axhline(100 * target, color="gray", ls="--", lw=1, label="GRPO best final mean (target)")
        ax.set_xlabel("optimizer step (same prompts x generations per step for every method)")
        ax.set_ylabel("held-out greedy accuracy (%), 32 problems")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(
        "GRPO vs SDPO, SmolLM2-135M-Instruct, 1-digit addition, CPU (thin: per seed, thick: mean)",
        fontsize=11,
    )
    fig.tight_layout()
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def table(rows: list[dict], target: float | None) -> str:
    lines = [
        "| method | lr | seeds | step 0 | final mean ± sd | final per seed | best mean (any step) "
        "| steps to GRPO best final mean (mean curve) | per seed | s/step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per = ", ".join(pct(v) for v in r["per_seed"].values())
        sts = ", ".join("-" if v is None else str(v) for v in r["steps_to_target_seed"].values())
        stm = "not reached" if r["steps_to_target_mean"] is None else str(r["steps_to_target_mean"])
        lines.append(
            f"| {label(r['method'])} | {r['lr']:g} | {','.join(map(str, r['seeds']))} | {pct(r['before'])} "
            f"| {pct(r['final_mean'])} ± {100 * r['final_sd']:.1f} | {per} | {pct(r['best_mean'])} "
            f"| {stm} | {sts} | {r['s_per_step']:.1f} |"
        )
    return "\n".join(lines)


def verdict(rows: list[dict], target: float | None) -> str:
    grpo = next((r for r in rows if r.get("is_target")), None)
    sdpo = next((r for r in rows if r["method"] == "sdpo"), None)
    if grpo is None or sdpo is None or target is None:
        return "Target not evaluated (needs finished `grpo` and `sdpo` runs)."
    half = grpo["max_steps"] / 2
    st = sdpo["steps_to_target_mean"]
    base = f"GRPO's best final mean accuracy ({label(grpo['method'])}, lr {grpo['lr']:g}) is {pct(target)} (step 0: {pct(grpo['before'])}) after {grpo['max_steps']} steps."
    if target <= grpo["before"] + 1e-9:
        base += (
            " GRPO did not improve on the untrained model, so 'reaching GRPO's final accuracy' is a"
            " low bar; the step count below says little on its own."
        )
    if st is None:
        return base + f" SDPO's mean curve never reached it: **target (<= {half:g} steps) not met**."
    ok = st <= half
    return base + (
        f" SDPO's mean curve first reaches it at step {st} (evaluated every"
        f" {min(b - a for a, b in zip(sorted(sdpo['mean_curve']), sorted(sdpo['mean_curve'])[1:], strict=False))}"
        f" steps): **target (<= {half:g} steps) {'met' if ok else 'not met'}** on the mean curve."
    )


def section(rows: list[dict], target: float | None, meta: dict, notes: str) -> str:
    from sdpo_unsloth.tasks.addition import DEMO_SETTINGS

    d = dict(DEMO_SETTINGS)
    any_meta = next(iter(meta.values()))
    return f"""## Learning curves: GRPO vs SDPO at the same budget (measured {time.strftime("%Y-%m-%d")})

**Measured** on CPU (2 cores shared with other jobs, `OMP_NUM_THREADS=1`, fp32), embedded
SmolLM2-135M-Instruct, the one-digit addition task of the demo. Every method uses the same split
(`held = addition_dataset({d["held_size"]}, seed={d["held_seed"]})`, train = {d["train_size"]} others), the same
prompts per step ({d["per_device_train_batch_size"] // d["num_generations"]} prompts x {d["num_generations"]} generations,
temperature {d["temperature"]:g}, {d["max_completion_length"]} tokens), {any_meta["max_steps"]} optimizer steps, LoRA r={d["lora_r"]} (alpha = r),
AdamW wd 0.01, grad clip 1.0, and the same Trainer/LoRA seed per run. GRPO = `SDPOConfig(enabled=False)` on
the same `SDPOTrainer`; SDPO = `DEMO_SETTINGS` (alpha {d["alpha"]:g}, top-K {d["distillation_topk"]} + tail,
{d["teacher_mode"]} teacher {d["teacher_update_rate"]:g}); hybrid = SDPO with `grpo_weight` (paper Eq. 3).
Learning rate: every method at the demo's lr ({d["learning_rate"]:g}, tuned for SDPO); GRPO also at a second
lr where a `grpo@LR` row exists. Held-out greedy accuracy (`evaluate`, eval mode, 8 tokens, first integer)
at step 0 and every 5 steps; {d["held_size"]} problems, so one problem = {100 / d["held_size"]:.1f} points.
"Steps to GRPO best final mean": first evaluated step (> 0) at which the curve reaches the final mean
accuracy of the best GRPO row (the highest final mean over the GRPO learning rates run); "-" = never within the run. s/step excludes evaluation.

{table(rows, target)}

{verdict(rows, target)}

![learning curves](learning_curves.png)

{notes.strip()}

Reproduce (CPU, about 3 minutes per run here; raw JSON lines in `--out`, reruns skip finished runs):

```
OMP_NUM_THREADS=1 python benchmarks/learning.py --methods grpo,sdpo --seeds 0,1,2 --out /tmp/learning.jsonl
OMP_NUM_THREADS=1 python benchmarks/learning.py --methods hybrid0.9 --seeds 0 --out /tmp/learning.jsonl
OMP_NUM_THREADS=1 python benchmarks/learning.py --methods grpo@2e-3 --seeds 0,1 --out /tmp/learning.jsonl
python benchmarks/learning.py --report-only --out /tmp/learning.jsonl --write --notes NOTES.md \\
    --compare /tmp/learning_v1.jsonl   # optional 2nd panel: a run file made under other settings
```

Scale up on a GPU (these flags have not been run on a GPU yet): `--gpu` (bf16, fp16 where bf16 is missing), `--model PATH` (a local directory or a cached
hub name; the device machines have no network), `--4bit` (QLoRA), `--digits 2` or `3` (harder task, where the
embedded model scores ~0% and a larger model is needed), `--max-steps`, `--eval-every`, `--seeds 0,1,2,3,4`
(5+ seeds: the spread between seeds is the dominant error here), `--lr`, `--num-generations 8 --batch 16`,
`--max-completion-length`, `--held-size 200` (a larger held-out set narrows the ±8 points of 32 problems).
For example `python benchmarks/learning.py --gpu --4bit --model /models/Qwen2.5-0.5B-Instruct --digits 2
--max-steps 200 --eval-every 20 --seeds 0,1,2,3,4 --lr 5e-5 --num-generations 8 --batch 16
--max-completion-length 16 --held-size 200 --methods grpo,sdpo,hybrid0.9 --out /tmp/learning_gpu.jsonl`.
"""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.report_only:
        s = settings(args)
        _, done = load(args.out)
        for seed in [int(x) for x in args.seeds.split(",")]:
            for method in args.methods.split(","):
                if (method, seed) in done:
                    print(f"skip {method} seed {seed}: already in {args.out}", flush=True)
                    continue
                run_one(s, method, seed, args.out)
    curves, meta = load(args.out)
    if not curves:
        print("no finished runs")
        return 1
    rows, target = summarise(curves, meta)
    print(table(rows, target))
    for r in rows:
        print(r["method"], {k: round(v, 3) for k, v in r["mean_curve"].items()})
    if args.write:
        panels = [(curves, rows, target, "current DEMO_SETTINGS")]
        if args.compare:
            c2, m2 = load(args.compare)
            r2, t2 = summarise(c2, m2)
            panels.append((c2, r2, t2, args.compare_title))
        plot(panels, PLOT)
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from bench_doc import write_section

        notes = Path(args.notes).read_text() if args.notes else ""
        write_section("learning", section(rows, target, meta, notes))
        print(f"wrote {PLOT} and the 'learning' section of docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
