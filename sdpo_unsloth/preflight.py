"""Preflight: is there anything for SDPO to learn from on this task, before training time is spent?

Samples a few prompts x ``num_generations`` with the real `SDPOTrainer` (its generation, rewards and
teacher planning, ``_generate_and_score_completions``), then evaluates its SDPO loss once under
``torch.no_grad`` to read the teacher-student divergence (``sdpo/teacher_student_kl``) on the samples
that have a teacher. No optimizer exists, no step is taken, the weights stay bit-identical, and the
trainer's logs, token count and random state are restored, so a training run that follows is the same
with or without a preflight.

Reported (`PreflightReport`): the pass rate (total reward >= ``success_reward_threshold``), the share of
prompt groups with a demonstration (a successful sibling), the share of samples whose teacher sees the
reward's feedback, the share with no teacher at all (no demonstration, no feedback: no SDPO loss), and
the mean divergence on the others. "Nothing to learn" means no sample has a teacher and, with the GRPO
hybrid on (or SDPO disabled: plain GRPO), no group has rewards that differ either: training would change
nothing but weight decay.

    from sdpo_unsloth.preflight import preflight
    print(preflight("embedded", "gym:basic_arithmetic", num_prompts=4).summary())
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import sys
import tempfile
import types
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .bootstrap import bootstrap
from .config import SDPOConfig
from .preconditions import UsageError

__all__ = ["NOTHING_TO_LEARN", "PreflightError", "PreflightReport", "preflight", "run_preflight"]

NOTHING_TO_LEARN = "nothing to learn from"


def _fixes(max_completion_length: int, clipped: float | None) -> list[str]:
    from .train_config import default_hybrid

    budget = f"a larger completion budget (max_completion_length={max_completion_length} now"
    budget += f"; {clipped:.0%} of the samples were cut off)" if clipped else ")"
    return [
        "add feedback to the reward (set `last_feedback`, or return RewardResult(score, feedback)) that names "
        "the right answer or what went wrong: then every failed sample gets a teacher",
        "easier prompts, so that some samples succeed and become demonstrations",
        budget,
        f"{default_hybrid()} if the reward gives partial credit, so GRPO learns from its differences",
    ]


class PreflightError(ValueError):
    """Raised by `train(..., preflight=True)` when there is nothing to learn from; the message has the fixes."""

    def __init__(self, report: PreflightReport):
        super().__init__(report.summary() + "\nTo train anyway, pass preflight=False (CLI: --no-preflight).")
        self.report = report


@dataclass(frozen=True)
class PreflightReport:
    """What a preflight measured on `prompts` prompts x `num_generations` samples.

    Attributes:
        prompts: prompts sampled.
        num_generations: samples per prompt (one group).
        pass_rate: share of samples whose total reward reached `success_reward_threshold`.
        mean_reward: mean total reward of the samples (unscorable ones left out; NaN if none).
        groups_with_demo: share of groups in which some sample's teacher sees a successful sibling.
        with_feedback: share of samples whose teacher sees the reward's feedback.
        no_teacher: share of samples with neither a demonstration nor feedback (no SDPO loss on them).
        distilled: share of samples the distillation term trains: a teacher and a distillation weight > 0 (the
            group hybrids train a group whose rewards differ with GRPO, not with its teachers).
        groups_with_reward_spread: share of groups whose rewards differ (what GRPO learns from).
        teacher_student_kl: mean per-token KL(student || teacher) on the distilled samples (None: none).
        distill_loss: mean per-token SDPO divergence on those samples (None: none).
        clipped: share of completions cut off at `max_completion_length` (None: not measured).
        max_completion_length: the completion budget used.
        grpo_weight: the GRPO weight of the run (0: pure SDPO; 1: a group hybrid, as `train()`'s default, or
            SDPO disabled).
        nothing_to_learn: no sample is distilled, and (with grpo_weight > 0) no group has a reward spread.
    """

    prompts: int
    num_generations: int
    pass_rate: float
    mean_reward: float
    groups_with_demo: float
    with_feedback: float
    no_teacher: float
    distilled: float
    groups_with_reward_spread: float
    teacher_student_kl: float | None
    distill_loss: float | None
    clipped: float | None
    max_completion_length: int
    grpo_weight: float
    nothing_to_learn: bool

    @property
    def samples(self) -> int:
        return self.prompts * self.num_generations

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "samples": self.samples}

    def summary(self) -> str:
        """A few lines for people: the measurements, then the verdict and, when needed, the fixes."""
        n = self.samples
        if self.teacher_student_kl is not None:
            kl = f"{self.teacher_student_kl:.4f}"
        else:
            kl = "n/a (no sample has a teacher)" if self.no_teacher == 1.0 else "n/a (no sample is distilled)"

        rows = [
            (
                "pass rate",
                f"{self.pass_rate:.0%} ({round(self.pass_rate * n)}/{n}); mean reward {self.mean_reward:.3f}",
            ),
            ("groups with a demonstration", f"{self.groups_with_demo:.0%}"),
            ("samples with feedback", f"{self.with_feedback:.0%}"),
            ("samples with no teacher", f"{self.no_teacher:.0%}"),
            ("samples distilled", f"{self.distilled:.0%}"),
            ("teacher-student KL/token", kl),
        ]
        if self.clipped is not None:
            rows.append(("cut off at the budget", f"{self.clipped:.0%}"))
        lines = [
            f"SDPO preflight on {self.prompts} prompts x {self.num_generations} samples "
            f"(max_completion_length={self.max_completion_length}):"
        ]
        if self.grpo_weight > 0:  # what the GRPO term learns from
            rows.insert(1, ("groups with a reward spread", f"{self.groups_with_reward_spread:.0%}"))
        lines += [f"  {label + ':':29s} {value}" for label, value in rows]
        if self.nothing_to_learn:
            lines.append(
                f"Verdict: {NOTHING_TO_LEARN}: no sample succeeded and the reward gave no feedback, so SDPO has no "
                "teacher for any sample"
                + (" and GRPO sees equal rewards" if self.grpo_weight > 0 else "")
                + ". Fixes:"
            )
            lines += [f"  - {fix}" for fix in _fixes(self.max_completion_length, self.clipped)]
        elif self.pass_rate == 1.0:
            lines.append(
                "Verdict: every sample already succeeds; SDPO only distils siblings' answers. Harder prompts teach more."
            )
        elif self.grpo_weight == 0:
            lines.append(
                f"Verdict: {1 - self.no_teacher:.0%} of the samples have a teacher; SDPO has a signal."
            )
        else:
            lines.append(self._hybrid_verdict())
        return "\n".join(lines)

    def _hybrid_verdict(self) -> str:
        """The verdict of a run with a GRPO term: which samples each term trains on."""
        text = (
            f"Verdict: GRPO has a signal in {self.groups_with_reward_spread:.0%} of the prompt groups (their rewards "
            f"differ); the distillation term trains {self.distilled:.0%} of the samples."
        )
        if self.distilled == 0 and self.no_teacher < 1.0:
            text += (
                " The samples with a teacher all have distillation weight 0 (a group hybrid trains a group "
                "whose rewards differ with GRPO only), so their teachers are not used and the KL is not measured. "
                "To distil them too: pure SDPO, SDPOConfig(grpo_weight=0.0)."
            )
        return text


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _snapshot(trainer: Any) -> dict[str, Any]:
    """What generation and the loss change besides the weights (restored after the preflight)."""
    return {
        "metrics": copy.deepcopy(trainer._metrics),
        "logs": copy.deepcopy(trainer._logs),
        "tokens": trainer.state.num_input_tokens_seen,
        "loss_calls": trainer._sdpo_loss_calls,
        "training": trainer.model.training,
        "stats": copy.deepcopy(getattr(trainer, "_sdpo_stats", None)),  # per-step metric sums, where kept
    }


@contextlib.contextmanager
def _random_states_kept() -> Iterator[None]:
    """Restores Python's, NumPy's and torch's (CPU and CUDA) global random states after the block."""
    from .checkpoints import random_states, set_random_states

    states = random_states()
    try:
        yield
    finally:
        set_random_states(states)


def _split(batch: Mapping[str, Any], n: int, size: int) -> list[dict[str, Any]]:
    """Micro-batches of `size` samples: tensors (and lists) with `n` rows are sliced, the rest shared."""
    import torch

    parts = []
    for start in range(0, n, size):
        part = {}
        for key, value in batch.items():
            rows = isinstance(value, torch.Tensor) and value.dim() > 0 and value.size(0) == n
            rows = rows or (isinstance(value, list) and len(value) == n)
            part[key] = value[start : start + size] if rows else value
        parts.append(part)
    return parts


def run_preflight(trainer: Any, rows: Sequence[Mapping[str, Any]]) -> PreflightReport:
    """Preflight with a built `SDPOTrainer` on `rows` (each sampled `trainer.num_generations` times)."""
    import torch

    if not rows:
        raise ValueError("preflight needs at least one prompt row.")
    cfg: SDPOConfig = trainer.sdpo_config
    group = trainer.num_generations
    inputs = [dict(row) for row in rows for _ in range(group)]  # TRL's RepeatSampler layout
    n = len(inputs)
    state = _snapshot(trainer)
    try:
        with _random_states_kept(), torch.no_grad():  # sampling leaves the user's (and training's) generators
            trainer.model.train()  # "train" mode: groups of num_generations, as in training
            trainer._metrics["train"].clear()
            batch = trainer._generate_and_score_completions(inputs)
            totals = trainer._total_rewards(n)
            if cfg.enabled and float(batch["sdpo_sample_mask"].sum()) > 0:
                for part in _split(batch, n, trainer.args.per_device_train_batch_size):
                    if float(part["sdpo_sample_mask"].sum()) > 0:
                        trainer._sdpo_loss(trainer.model, part)
        measured = {k: list(v) for k, v in trainer._metrics["train"].items()}
    finally:
        trainer._metrics = state["metrics"]
        trainer._logs = state["logs"]
        trainer.state.num_input_tokens_seen = state["tokens"]
        trainer._sdpo_loss_calls = state["loss_calls"]
        trainer.model.train(state["training"])
        if state["stats"] is not None:
            trainer._sdpo_stats = state["stats"]

    scored = [t for t in totals if not math.isnan(t)]
    success = [not math.isnan(t) and t >= cfg.success_reward_threshold for t in totals]
    groups = [range(g * group, (g + 1) * group) for g in range(len(rows))]
    with_demo = sum(group > 1 and any(success[i] for i in members) for members in groups) / len(groups)
    spread = sum(len({totals[i] for i in members if not math.isnan(totals[i])}) > 1 for members in groups)
    with_feedback = _mean(measured.get("sdpo/frac_with_feedback", [])) or 0.0
    no_teacher = _mean(measured.get("sdpo/frac_masked", []))
    no_teacher = 1.0 if no_teacher is None else no_teacher
    spread_share = spread / len(groups)
    grpo_weight = cfg.grpo_weight if cfg.enabled else 1.0  # SDPO off: a plain GRPO run
    distilled = (_mean(measured.get("sdpo/frac_distilled", [])) or 0.0) if cfg.enabled else 0.0
    sdpo_learns = distilled > 0
    return PreflightReport(
        prompts=len(rows),
        num_generations=group,
        pass_rate=sum(success) / n,
        mean_reward=sum(scored) / len(scored) if scored else float("nan"),
        groups_with_demo=with_demo,
        with_feedback=with_feedback,
        no_teacher=no_teacher,
        distilled=distilled,
        groups_with_reward_spread=spread_share,
        teacher_student_kl=_mean(measured.get("sdpo/teacher_student_kl", [])),
        distill_loss=_mean(measured.get("sdpo/distill_loss", [])) if distilled > 0 else None,
        clipped=_mean(measured.get("completions/clipped_ratio", [])),
        max_completion_length=trainer.max_completion_length,
        grpo_weight=grpo_weight,
        nothing_to_learn=not sdpo_learns and (grpo_weight == 0 or spread_share == 0),
    )


def preflight(
    model: Any = "embedded",
    dataset: Any = "addition",
    rewards: Any = None,
    *,
    tokenizer: Any = None,
    num_prompts: int = 4,
    num_generations: int = 4,
    max_completion_length: int | None = None,
    temperature: float = 1.0,
    seed: int = 3407,
    sdpo_config: SDPOConfig | None = None,
    lora_r: int = 16,
    load_in_4bit: bool | None = None,
    max_seq_length: int = 2048,
    backend: str = "auto",
) -> PreflightReport:
    """Sample `num_prompts` prompts x `num_generations` and report what SDPO could learn from them.

    Args:
        model: as in `train`: a hub name, a local folder or "embedded" (loaded with a fresh LoRA student),
            or an already loaded model (then pass `tokenizer`; a model without LoRA gets one attached).
        dataset: as in `train`: a Dataset, a list of dicts, a built-in task ("addition", "code",
            "humaneval", "gym:<task>") or a file.
        rewards: as in `train` (default: the built-in task's reward).
        tokenizer: the tokenizer of a loaded `model`.
        num_prompts: prompts sampled (seeded random rows of the dataset).
        num_generations: samples per prompt.
        max_completion_length: completion budget (default: the task's, else 128).
        temperature: sampling temperature.
        seed: seeds the prompt choice and the sampling.
        sdpo_config: SDPO settings (default: `train()`'s hybrid): threshold, feedback rules,
            divergence, hybrid (a group whose rewards differ gives GRPO a signal).
        lora_r, load_in_4bit, max_seq_length, backend: as in `train`, when `model` is a name.

    Returns:
        A `PreflightReport`; `.summary()` is the text `sdpo-unsloth preflight` prints.
    """
    from .data import _resolve_dataset, _resolve_rewards, task_completion_length
    from .train_config import _build_grpo_config, _build_sdpo_config

    if num_prompts < 1 or num_generations < 2:
        raise UsageError(
            f"preflight needs num_prompts >= 1 and num_generations >= 2, got {num_prompts} and {num_generations}."
        )
    chosen = bootstrap(None if backend == "auto" else backend)
    data, task = _resolve_dataset(dataset, num_prompts, seed)
    reward_funcs = _resolve_rewards(rewards, task)
    if max_completion_length is None:
        max_completion_length = task_completion_length(task) or 128
    sdpo = sdpo_config if sdpo_config is not None else _build_sdpo_config(None)
    # Loading a model and the trainer's constructor seed Python, NumPy and torch (transformers' set_seed): the
    # user's generators must come out of a preflight as they went in.
    with _random_states_kept():
        if isinstance(model, str):
            from .model import load_model

            needs_teacher = sdpo.ema_teacher
            model, tokenizer = load_model(
                model,
                load_in_4bit=load_in_4bit,
                max_seq_length=max_seq_length,
                lora_r=lora_r,
                teacher_adapter=sdpo.teacher_adapter_name if needs_teacher else None,
                gradient_checkpointing=False,
                backend=chosen.name,
                seed=seed,
            )
        elif tokenizer is None:
            raise UsageError("preflight got a loaded model without its tokenizer: pass tokenizer=...")
        order = list(range(len(data)))
        random.Random(seed).shuffle(order)
        rows = [data[i] for i in sorted(order[:num_prompts])]
        from .trainer import SDPOTrainer

        with tempfile.TemporaryDirectory(prefix="sdpo-preflight-") as scratch:
            args = _build_grpo_config(
                None,
                chosen.device,
                Path(scratch),
                max_steps=1,
                num_generations=num_generations,
                per_device_train_batch_size=num_generations,
                gradient_accumulation_steps=1,
                max_completion_length=max_completion_length,
                temperature=temperature,
                seed=seed,
                gradient_checkpointing=False,
                disable_tqdm=True,
            )
            trainer = SDPOTrainer(
                model=model,
                reward_funcs=reward_funcs,
                args=args,
                sdpo_config=sdpo,
                processing_class=tokenizer,
                train_dataset=data,
            )
            return run_preflight(trainer, rows)


class _CallableModule(types.ModuleType):
    """Importing this module makes `sdpo_unsloth.preflight` the module (Python sets the package attribute),
    shadowing the lazy function of the same name: calling the module calls the function, so
    `sdpo_unsloth.preflight(...)` works whichever was imported first."""

    def __call__(self, *args: Any, **kwargs: Any) -> PreflightReport:
        return preflight(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
