"""What SDPO's teacher teaches on a task, before any training (CPU, the embedded model).

    OMP_NUM_THREADS=1 python benchmarks/investigations/teacher_gap.py --tasks addition,gym:gcd?max_value=20 [--write]

For each task: sample `--generations` completions of `--prompts` training prompts from the untrained model
(temperature 0.7, the panel's budget), score them with the task's reward, build every sample's teacher
prompt with the kit's own rules (`plan_reprompts`, default `SDPOConfig`) and read, with one unpadded forward
per sample, the student's and the teacher's next-token distributions on the completion (at step 0 the EMA
teacher is the student, so the teacher is the same weights under the teacher prompt). Reported per kind of
teacher (demonstration / feedback only) and the sample's outcome (success / failure):

- `gap`: mean teacher-minus-student log-probability of the sampled tokens (what the sampled-token surrogate
  pushes), and the share of tokens where the teacher ranks a different token first;
- `mass moved`: the probability mass the teacher puts above the student, sum over tokens v of
  max(q(v) - p(v), 0) at each position, summed per token v over all positions: the words the full-distribution
  distillation pulls the student toward. Its top tokens, and the share of it that lands on (a) tokens of the
  feedback text and (b) digits: an "echo" share says the teacher mostly teaches the student to repeat what
  only the teacher was told.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter, defaultdict
from datetime import date
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SDPO_UNSLOTH_BACKEND", "transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: learning_tasks, common

import torch

KINDS = ("demonstration, success", "demonstration, failure", "feedback only, failure")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="addition")
    p.add_argument("--prompts", type=int, default=12)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--max-completion-length", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top", type=int, default=12, help="tokens listed per kind of teacher")
    p.add_argument("--out", default="", help="append one JSON line per task here")
    p.add_argument(
        "--write", action="store_true", help="write the 'teacher-gap' section of docs/benchmarks.md"
    )
    p.add_argument(
        "--from-file", default="", help="write the section from the JSON lines of an earlier --out"
    )
    return p.parse_args(argv)


def render(tokenizer, prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)


def next_token_logps(model, prompt_ids: list[int], completion_ids: list[int]) -> torch.Tensor:
    """[L, V] log-probabilities of the next token at each completion position (one unpadded forward)."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
    return torch.log_softmax(logits, dim=-1)


def is_digit_token(text: str) -> bool:
    stripped = text.strip()
    return bool(stripped) and stripped.isdigit()


def analyse_task(model, tokenizer, name: str, args: argparse.Namespace) -> dict:
    from learning_tasks import load_task

    from sdpo_unsloth import SDPOConfig
    from sdpo_unsloth.teacher import plan_reprompts

    task = load_task(name, 32)
    rows = task.train[: args.prompts]
    cfg = SDPOConfig()
    torch.manual_seed(args.seed)
    prompts, completions, columns = [], [], defaultdict(list)
    model.eval()
    for row in rows:
        text = render(tokenizer, row["prompt"])
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            out = model.generate(
                ids.repeat(args.generations, 1),
                do_sample=True,
                temperature=args.temperature,
                top_p=1.0,
                top_k=0,
                max_new_tokens=args.max_completion_length,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )
        for seq in out[:, ids.size(1) :]:
            tokens = seq.tolist()
            if tokenizer.eos_token_id in tokens:
                tokens = tokens[: tokens.index(tokenizer.eos_token_id) + 1]
            prompts.append(row["prompt"])
            completions.append(tokens)
            for key, value in row.items():
                if key != "prompt":
                    columns[key].append(value)
    texts = [tokenizer.decode(c, skip_special_tokens=True) for c in completions]
    is_chat = not isinstance(prompts[0], str)
    shown = [[{"role": "assistant", "content": t}] for t in texts] if is_chat else texts
    rewards = [float(r) for r in task.reward(prompts=prompts, completions=shown, **columns)]
    feedback = list(getattr(task.reward, "last_feedback", None) or [""] * len(texts))
    plans = plan_reprompts(
        prompts,
        texts,
        rewards,
        feedback,
        group_size=args.generations,
        **cfg.reprompt_options(),
    )
    kinds: dict[str, dict] = {}
    for i, plan in enumerate(plans):
        if not plan.active or not completions[i]:
            continue
        outcome = "success" if rewards[i] >= cfg.success_reward_threshold else "failure"
        kind = ("demonstration" if plan.has_demo else "feedback only") + ", " + outcome
        k = kinds.setdefault(
            kind,
            {
                "samples": 0,
                "tokens": 0,
                "gap": 0.0,
                "argmax_differs": 0,
                "mass": Counter(),
                "echo": 0.0,
                "digit": 0.0,
            },
        )
        student_ids = tokenizer(render(tokenizer, prompts[i]), add_special_tokens=False).input_ids
        teacher_ids = tokenizer(render(tokenizer, plan.prompt), add_special_tokens=False).input_ids
        p = next_token_logps(model, student_ids, completions[i])
        q = next_token_logps(model, teacher_ids, completions[i])
        sampled = torch.tensor(completions[i])
        k["samples"] += 1
        k["tokens"] += len(completions[i])
        k["gap"] += float((q - p).gather(1, sampled[:, None]).sum())
        k["argmax_differs"] += int((q.argmax(-1) != p.argmax(-1)).sum())
        moved = (q.exp() - p.exp()).clamp_min(0).sum(0)  # [V]: mass the teacher adds to each token
        told = set(
            tokenizer((plan.feedback or "") + " " + (plan.demo or ""), add_special_tokens=False).input_ids
        )
        for v in torch.nonzero(moved > 1e-3).flatten().tolist():
            k["mass"][v] += float(moved[v])
        if told:
            k["echo"] += float(moved[list(told)].sum())
    report = {
        "task": name,
        "samples": len(texts),
        "success_share": sum(r >= 1.0 for r in rewards) / len(rewards),
    }
    for kind, k in kinds.items():
        total = sum(k["mass"].values())
        digits = sum(m for v, m in k["mass"].items() if is_digit_token(tokenizer.decode([v])))
        report[kind] = {
            "samples": k["samples"],
            "gap_per_token": round(k["gap"] / k["tokens"], 4),
            "argmax_differs": round(k["argmax_differs"] / k["tokens"], 3),
            "mass_per_token": round(total / k["tokens"], 4),
            "echo_share": round(k["echo"] / total, 3) if total else 0.0,
            "digit_share": round(digits / total, 3) if total else 0.0,
            "top": [
                (tokenizer.decode([v]), round(m / k["tokens"], 4)) for v, m in k["mass"].most_common(args.top)
            ],
        }
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from learning_tasks import short_name, split_tasks

    if args.from_file:
        records = [json.loads(line) for line in Path(args.from_file).read_text().splitlines() if line.strip()]
        reports = list({r["task"]: r for r in records}.values())  # the last record of each task
        argv = records[-1]["argv"]
        args = parse_args(argv)  # the settings those records were measured with
        args.write = True
    else:
        from sdpo_unsloth.model import load_model

        model, tokenizer = load_model(
            "embedded", load_in_4bit=False, teacher_adapter=None, gradient_checkpointing=False, seed=args.seed
        )
        reports = []
        argv = sys.argv[1:] if argv is None else list(argv)
        for name in split_tasks(args.tasks):
            r = analyse_task(model, tokenizer, name, args)
            reports.append(r)
            print(json.dumps(r), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps({**r, "argv": argv}) + "\n")
    if args.write:
        from common import write_section

        lines = [
            "## What SDPO's teacher teaches at step 0 (CPU, embedded model)",
            "",
            f"Measured {date.today()} on the untrained embedded model (CPU), {args.prompts} prompts x "
            f"{args.generations} samples per task, {args.max_completion_length}-token budget, default SDPOConfig. "
            "Per kind of teacher: tokens, mean teacher-minus-student log-prob of the sampled token, share of positions "
            "where the teacher's first choice differs, probability mass the teacher adds per position, the share of it "
            "on tokens of the feedback/demonstration text and on digits, and the tokens that get the most.",
            "",
            "| task | success | teacher | samples | gap/token | argmax differs | mass/token | echo share | digit share "
            "| top tokens pulled up |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in reports:
            for kind in KINDS:
                if kind in r:
                    k = r[kind]
                    top = ", ".join(f"`{t!r}`" for t, _ in k["top"][:6])
                    lines.append(
                        f"| {short_name(r['task'])} | {r['success_share']:.0%} | {kind} | {k['samples']} | "
                        f"{k['gap_per_token']:+.3f} | {k['argmax_differs']:.0%} | {k['mass_per_token']:.3f} | "
                        f"{k['echo_share']:.0%} | {k['digit_share']:.0%} | {top} |"
                    )
        cmd = "OMP_NUM_THREADS=1 python benchmarks/investigations/teacher_gap.py " + " ".join(
            f"'{a}'" if "?" in a or "&" in a else a for a in argv
        )
        lines += ["", "```", cmd, "```"]
        write_section("teacher-gap", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
