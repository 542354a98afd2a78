"""Tune the `sdpo-unsloth demo` run with the real `SDPOTrainer` (CPU, embedded SmolLM2-135M-Instruct).

One line per run: settings, seed, held-out greedy accuracy before and after, steps and wall times.
Results are recorded in docs/demo-design.md ("Verified with SDPOTrainer").

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/learning/demo_tuning.py --seeds 0,1
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/learning/demo_tuning.py --grpo --seeds 0
    python benchmarks/learning/demo_tuning.py --recommended --seeds 0   # the DEMO_SETTINGS of tasks/addition.py
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared `common` module
from common import CPU_RUN, LEARNING_RUN

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _topk(value: str) -> int | None:
    return None if value.lower() in ("none", "full") else int(value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--recommended", action="store_true", help="start from DEMO_SETTINGS (other flags override)"
    )
    p.add_argument("--seeds", default="0", help="comma list; one run per seed")
    p.add_argument("--grpo", action="store_true", help="plain GRPO (SDPOConfig(enabled=False))")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--num-generations", type=int)
    p.add_argument("--batch", type=int, help="per_device_train_batch_size (completions per step)")
    p.add_argument("--temperature", type=float)
    p.add_argument("--max-completion-length", type=int)
    p.add_argument("--lora-r", type=int)
    p.add_argument("--lora-alpha", type=int, help="LoRA alpha (default: = r, as load_model)")
    p.add_argument("--alpha", type=float, help="SDPO divergence alpha")
    p.add_argument("--topk", help="distillation_topk: int or none (full vocabulary)")
    p.add_argument("--teacher-mode", choices=("ema", "frozen", "live", "trust_region"))
    p.add_argument("--teacher-rate", type=float)
    p.add_argument("--grpo-weight", type=float, help="SDPOConfig.grpo_weight (0: the seed's pure SDPO)")
    p.add_argument("--hybrid-mode", choices=("fixed", "per_group", "failed_groups", "failures"))
    p.add_argument("--distill-anchor", type=float, help="SDPOConfig.distill_anchor")
    p.add_argument("--no-tail", action="store_true")
    p.add_argument("--train-size", type=int)
    p.add_argument("--held-size", type=int)
    p.add_argument("--eval-every", type=int, default=0, help="also print held-out accuracy every N steps")
    p.add_argument("--verbose", action="store_true", help="print the trainer's logs")
    return p.parse_args(argv)


BASE = dict(
    max_steps=30,
    learning_rate=1e-3,
    num_generations=4,
    per_device_train_batch_size=8,
    temperature=1.0,
    max_completion_length=8,
    lora_r=16,
    lora_alpha=None,
    alpha=1.0,
    distillation_topk=100,
    teacher_mode="ema",
    teacher_update_rate=0.1,
    tail=True,
    grpo_weight=0.0,  # the seed's pure SDPO; --recommended takes the demo's (train()'s default hybrid)
    hybrid_mode="fixed",
    distill_anchor=0.0,
    train_size=68,
    train_seed=0,
    held_size=32,
    held_seed=1,
)


def settings_from(args: argparse.Namespace) -> dict:
    s = dict(BASE)
    if args.recommended:
        from sdpo_unsloth.tasks.addition import DEMO_SETTINGS

        demo = dict(DEMO_SETTINGS)
        s.update({k: v for k, v in demo.items() if k in s})
    overrides = {
        "max_steps": args.max_steps,
        "learning_rate": args.lr,
        "num_generations": args.num_generations,
        "per_device_train_batch_size": args.batch,
        "temperature": args.temperature,
        "max_completion_length": args.max_completion_length,
        "lora_r": args.lora_r,
        "lora_alpha": args.lora_alpha,
        "alpha": args.alpha,
        "teacher_mode": args.teacher_mode,
        "teacher_update_rate": args.teacher_rate,
        "grpo_weight": args.grpo_weight,
        "hybrid_mode": args.hybrid_mode,
        "distill_anchor": args.distill_anchor,
        "train_size": args.train_size,
        "held_size": args.held_size,
    }
    s.update({k: v for k, v in overrides.items() if v is not None})
    if args.topk is not None:
        s["distillation_topk"] = _topk(args.topk)
    if args.no_tail:
        s["tail"] = False
    s["grpo"] = args.grpo
    return s


def describe(s: dict) -> str:
    common = (
        f"steps={s['max_steps']} lr={s['learning_rate']:g} G={s['num_generations']} "
        f"bs={s['per_device_train_batch_size']} T={s['temperature']:g} len={s['max_completion_length']} "
        f"r={s['lora_r']}/{s['lora_alpha'] or s['lora_r']}"
    )
    if s["grpo"]:
        return "GRPO " + common
    teacher = s["teacher_mode"] + (f"{s['teacher_update_rate']:g}" if s["teacher_mode"] == "ema" else "")
    tail = "" if s["tail"] else " no-tail"
    mix = "" if s["grpo_weight"] == 0 else f" w={s['grpo_weight']:g} {s['hybrid_mode']}"
    anchor = f" anchor={s['distill_anchor']:g}" if s["distill_anchor"] else ""
    return f"SDPO a={s['alpha']:g} K={s['distillation_topk']}{tail}{mix}{anchor} teacher={teacher} " + common


def run(s: dict, seed: int, eval_every: int, verbose: bool) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig

    from sdpo_unsloth import SDPOConfig, SDPOTrainer
    from sdpo_unsloth.model import load_model
    from sdpo_unsloth.tasks.addition import AdditionReward, addition_dataset, evaluate

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    t0 = time.perf_counter()
    held = addition_dataset(s["held_size"], seed=s["held_seed"])
    train_rows = addition_dataset(s["train_size"], seed=s["train_seed"], exclude=held)
    model, tokenizer = load_model(
        "embedded",
        load_in_4bit=False,
        lora_r=s["lora_r"],
        lora_alpha=s["lora_alpha"],
        gradient_checkpointing=False,
        teacher_adapter=None if s["grpo"] else "sdpo_teacher",
        seed=seed,
    )
    t_load = time.perf_counter() - t0
    before = evaluate(model, tokenizer, held)
    t_before = time.perf_counter() - t0 - t_load

    sdpo = (
        SDPOConfig(enabled=False)
        if s["grpo"]
        else SDPOConfig(
            alpha=s["alpha"],
            distillation_topk=s["distillation_topk"],
            distillation_add_tail=s["tail"],
            teacher_mode=s["teacher_mode"],
            teacher_update_rate=s["teacher_update_rate"],
            grpo_weight=s["grpo_weight"],
            hybrid_mode=s["hybrid_mode"],
            distill_anchor=s["distill_anchor"],
        )
    )
    out = tempfile.mkdtemp(prefix="demo_tuning_")
    args = GRPOConfig(
        output_dir=out,
        max_steps=s["max_steps"],
        learning_rate=s["learning_rate"],
        num_generations=s["num_generations"],
        per_device_train_batch_size=s["per_device_train_batch_size"],
        gradient_accumulation_steps=1,
        temperature=s["temperature"],
        max_completion_length=s["max_completion_length"],
        **CPU_RUN,
        **LEARNING_RUN,
        seed=seed,
        data_seed=seed,
    )
    trainer = SDPOTrainer(
        model=model,
        args=args,
        sdpo_config=sdpo,
        processing_class=tokenizer,
        reward_funcs=[AdditionReward()],
        train_dataset=Dataset.from_list(train_rows),
    )
    if not verbose:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    curve: list[str] = []
    if eval_every:

        class _Eval(TrainerCallback):
            def on_step_end(self, a, state, control, **kw):
                if state.global_step % eval_every == 0 and state.global_step < s["max_steps"]:
                    curve.append(f"{state.global_step}:{evaluate(trainer.model, tokenizer, held):.0%}")

        trainer.add_callback(_Eval())
    t1 = time.perf_counter()
    trainer.train()
    t_train = time.perf_counter() - t1
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    t2 = time.perf_counter()
    after = evaluate(trainer.model, tokenizer, held)
    t_after = time.perf_counter() - t2
    samples = _greedy_replies(trainer.model, tokenizer, held[:3])
    return {
        "before": before,
        "after": after,
        "curve": curve,
        "samples": samples,
        "train_reward": sum(rewards) / len(rewards) if rewards else float("nan"),
        "t_load": t_load,
        "t_before": t_before,
        "t_train": t_train,
        "t_after": t_after,
        "total": time.perf_counter() - t0,
    }


def _greedy_replies(model, tokenizer, rows) -> list[str]:
    import torch

    model.eval()
    replies = []
    for row in rows:
        text = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(
                **enc, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        replies.append(tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    return replies


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    s = settings_from(args)
    for seed in [int(x) for x in args.seeds.split(",")]:
        r = run(s, seed, args.eval_every, args.verbose)
        curve = f" curve={','.join(r['curve'])}" if r["curve"] else ""
        reward = f" train_reward={r['train_reward']:.2f}"
        print(
            f"{describe(s)} seed={seed} | before={r['before']:.1%} after={r['after']:.1%}{curve}{reward} | "
            f"load={r['t_load']:.0f}s eval={r['t_before']:.0f}+{r['t_after']:.0f}s "
            f"train={r['t_train']:.0f}s ({r['t_train'] / s['max_steps']:.1f}s/step) total={r['total']:.0f}s",
            flush=True,
        )
        print(f"  greedy replies after: {r['samples']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
