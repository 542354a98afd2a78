"""Per-optimizer-step bookkeeping over the micro-batches TRL buffers (a mixin of `SDPOTrainer`).

The SDPO loss of a micro-batch is divided by the teacher/sequence counts of its whole optimizer step, so
the step's gradient is the mean over its sequences whatever the split into micro-batches; metrics are
accumulated over the step and logged once, summed over processes; under several processes the LoRA
gradients are averaged here (the loss runs the unwrapped decoder, so DDP's hooks never arm). Also the
layout of `old_per_token_logps` under TRL and unsloth.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def hybrid_weights(
    rewards: list[float], group_size: int, *, weight: float, mode: str, success_threshold: float = 1.0
) -> tuple[list[float], list[float]]:
    """Per-sample (GRPO weight, distillation weight) of the hybrid.

    fixed: (w, 1 - w) everywhere; per_group: (w, 1 - w) in prompt groups whose rewards differ, (0, 1) in the
    others (equal rewards give GRPO no signal); failed_groups: as per_group, except that a sample at or above
    `success_threshold` in a group of equal rewards (all succeeded) gets (0, 0), no update: distilling it
    towards a sibling's success lowers what worked; failures: w on every sample, distillation 1 on samples below
    `success_threshold` and 0 on successes (they are reinforced by GRPO, not distilled).

    >>> hybrid_weights([1.0, 0.0, 0.0, 0.0], 2, weight=0.9, mode="per_group")
    ([0.9, 0.9, 0.0, 0.0], [0.09999999999999998, 0.09999999999999998, 1.0, 1.0])
    >>> hybrid_weights([1.0, 1.0, 0.0, 0.0, 1.0, 0.0], 2, weight=1.0, mode="failed_groups")
    ([0.0, 0.0, 0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    >>> hybrid_weights([1.0, 0.0], 2, weight=0.5, mode="fixed")
    ([0.5, 0.5], [0.5, 0.5])
    >>> hybrid_weights([1.0, 0.0, 0.0, 0.0], 2, weight=1.0, mode="failures")
    ([1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0])
    """
    if mode == "failures":
        return [weight] * len(rewards), [0.0 if r >= success_threshold else 1.0 for r in rewards]
    if mode == "fixed":
        return [weight] * len(rewards), [1.0 - weight] * len(rewards)
    grpo: list[float] = []
    distill: list[float] = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        scores = [r for r in group if math.isfinite(r)]
        differ = len(scores) > 1 and max(scores) > min(scores)
        grpo += [weight if differ else 0.0] * len(group)
        if differ or mode != "failed_groups":
            distill += [1.0 - weight if differ else 1.0] * len(group)
        else:
            distill += [0.0 if r >= success_threshold else 1.0 for r in group]
    return grpo, distill


def align_old_logps(old: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
    """`old_per_token_logps` as [B, L], one value per completion token.

    TRL stores them as [B, L]. Unsloth's GRPO computes them on left-packed rows (prompt padding moved to
    the right) over the last L + max_left_pad positions, and returns `max_left_pad`: completion token j of
    a row with p prompt pads sits at column max_left_pad - p + j there.
    """
    length = inputs["completion_ids"].size(1)
    if old.shape[1] == length:
        return old
    if "max_left_pad" in inputs and old.shape[1] > length:
        max_left_pad = int(inputs["max_left_pad"].reshape(-1)[0])
        prompt_pads = (inputs["prompt_mask"] == 0).sum(dim=1)  # [B]
        columns = (max_left_pad - prompt_pads)[:, None] + torch.arange(length, device=old.device)  # [B, L]
        return old.gather(1, columns.clamp(0, old.shape[1] - 1))
    raise RuntimeError(
        f"old_per_token_logps has shape {tuple(old.shape)} for completions of length {length}: this layout is "
        "not known to SDPOTrainer. `sdpo-unsloth doctor` prints the versions: pin the tested ones or report it."
    )


def _teacher_count(batch: dict[str, Any]) -> float:
    """Sequences with a teacher and at least one completion token in one micro-batch."""
    has_tokens = batch["completion_mask"].sum(dim=1) > 0
    return float(((batch["sdpo_sample_mask"] > 0) & has_tokens).sum())


class StepStats:
    def _window_counts(self, inputs: dict[str, Any]) -> float:
        """The count of sequences with a teacher that this micro-batch's distillation loss is divided by.

        In training, the counts of the optimizer step's micro-batches that come from the same generation
        batch as this one (TRL buffers them all), scaled to the step's number of micro-batches. Where the
        step lies within one generation batch that is exact: the step's loss is the mean over its sequences
        whatever the split into micro-batches. Where it spans several (gradient_accumulation_steps above
        steps_per_generation), the counts of a batch not generated yet are unknown, so each batch's count is
        scaled to the step, an estimate that is exact when the batches have equal counts (every micro-batch
        weighs alike then), as TRL's "dapo" normaliser does with tokens. The Trainer does not divide by the
        accumulation steps (GRPOTrainer sets `compute_loss_func`).
        """
        buffered = getattr(self, "_buffered_inputs", None) or []
        if not self.model.training or not any(batch is inputs for batch in buffered):
            return self._across_processes(_teacher_count(inputs))  # evaluation, or a direct call
        per_generation = self.args.steps_per_generation
        every = self._generate_every()  # micro-steps one generation batch serves (GenerationBuffer)
        accumulation = getattr(
            self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps
        )
        start, size = self._sdpo_window or (self._step - self._step % accumulation, accumulation)
        window = range(start, start + size)
        same = [m for m in window if m // every == self._step // every]
        scale = size / len(same)  # 1 within one generation batch; the batches spanned, over whole ones
        return self._across_processes(sum(_teacher_count(buffered[m % per_generation]) for m in same) * scale)

    def _across_processes(self, count: float) -> float:
        """The count of all processes, divided by their number: the gradient is averaged over processes."""
        processes = self.accelerator.num_processes
        if processes == 1:
            return count
        total = self.accelerator.reduce(
            torch.tensor([count], device=self.accelerator.device), reduction="sum"
        )
        return float(total[0]) / processes

    def _stat_names(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(token-mean metrics, step-sum metrics) of this configuration, the same on every process."""
        cfg = self.sdpo_config
        means = ["sdpo/distill_loss"]
        if cfg.is_clip is not None:
            means.append("sdpo/is_clip_frac")
        if not cfg.sampled_token:
            means.append("sdpo/teacher_student_kl")
        if self.reference_kl_beta > 0 or cfg.distill_anchor > 0:
            means.append("kl")  # TRL's name for the mean KL to the reference
        return tuple(means), ("sdpo/grpo_loss",) if cfg.grpo_weight > 0 else ()

    def _add_stat(self, name: str, total: float, count: float = 0.0) -> None:
        """Accumulate a metric over the optimizer step: a token mean (sum and count) or a step sum."""
        entry = self._sdpo_stats.setdefault(name, [0.0, 0.0])
        entry[0] += total
        entry[1] += count

    def _end_micro_batch(self, mode: str) -> None:
        """After the step's last micro-batch, log each metric once: per optimizer step, split-independent,
        over all processes (summed there, so every process logs the same value)."""
        window = self._sdpo_window
        if mode == "train" and window is not None and self._step < window[0] + window[1] - 1:
            return
        means, sums = self._stat_names()
        names = means + sums
        values = torch.tensor([v for name in names for v in self._sdpo_stats.get(name, (0.0, 0.0))])
        if self.accelerator.num_processes > 1:
            values = self.accelerator.reduce(values.to(self.accelerator.device), reduction="sum").cpu()
        for i, name in enumerate(names):
            total, count = float(values[2 * i]), float(values[2 * i + 1])
            if name in sums:  # a sum of per-process shares of one loss: their mean over processes
                self._metrics[mode][name].append(total / self.accelerator.num_processes)
            elif count > 0:
                self._metrics[mode][name].append(total / count)
        self._sdpo_stats = {}

    @torch.no_grad()
    def _average_gradients(self) -> None:
        """Mean of the trainable gradients over processes, before clipping and the optimizer step.

        The SDPO loss runs the decoder of the unwrapped model (it needs hidden states, not [B, T, V]
        logits), so DDP's own gradient hooks never arm; the LoRA gradients are averaged here instead.
        """
        params = [p for p in self._peft_model().parameters() if p.requires_grad]
        flat = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
        )
        flat = self.accelerator.reduce(flat, reduction="mean")
        offset = 0
        for param in params:
            size = param.numel()
            param.grad = flat[offset : offset + size].view_as(param).to(param.dtype).clone()
            offset += size
