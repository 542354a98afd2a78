"""`SDPOTrainer`: TRL's `GRPOTrainer` (unsloth's patched one on a GPU) with the SDPO loss.

Importing this module runs `bootstrap()` first, so the class below subclasses whatever
`trl.GRPOTrainer` is after unsloth patched it. Overridden hooks, each calling the pure modules:

    _generate_and_score_completions  + teacher prompts, demonstrations, feedback, sample mask
    compute_loss / _compute_loss     SDPO distillation (chunked top-K), optional GRPO blend; both,
                                     since unsloth's compute_loss never calls _compute_loss
    _save / _save_checkpoint / _load_from_checkpoint
                                     the teacher adapter lives in checkpoints, never in exports;
                                     checkpoints are staged and renamed (`checkpoints.AtomicCheckpoints`)
A callback refuses optimizer steps on non-finite gradients and applies the EMA teacher update
after every real optimizer step.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from .bootstrap import bootstrap

BACKEND = bootstrap()

import torch  # noqa: E402
import trl  # noqa: E402
from torch import nn  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from . import loss as sdpo_loss  # noqa: E402
from .budget import TimeBudget  # noqa: E402
from .checkpoints import AtomicCheckpoints  # noqa: E402
from .config import SDPOConfig  # noqa: E402
from .faults import fault_point  # noqa: E402
from .model import STUDENT_ADAPTER, add_teacher_adapter, attach_lora  # noqa: E402
from .preconditions import check_trainer_inputs  # noqa: E402
from .rewards.protocol import CheckedReward, combine_feedback  # noqa: E402
from .teacher import (  # noqa: E402
    Reprompt,
    adapter_scope,
    build_reprompt,
    copy_adapter,
    ema_update,
    plan_reprompts,
)

# Inside each checkpoint, as a file: a sub-folder holding adapter_model.safetensors would make the
# Trainer load only sub-folder adapters on resume and skip the student at the checkpoint's root.
TEACHER_FILE = "sdpo_teacher.safetensors"
_KEYS = ("sdpo_teacher_prompt_ids", "sdpo_teacher_prompt_mask", "sdpo_sample_mask", "sdpo_active_total")


class _TeacherCallback(TrainerCallback):
    """Refuses non-finite optimizer steps; moves the EMA teacher after each real one."""

    def __init__(self, trainer: Any):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        if trainer.sdpo_config.enabled and trainer._sdpo_loss_calls == 0:
            mro = type(trainer).__mro__
            base = mro[mro.index(_SDPOMixin) + 1].__name__
            raise RuntimeError(
                f"the SDPO loss did not run before the first optimizer step: the base trainer ({base}) computed "
                "its own loss without calling SDPOTrainer.compute_loss, "
                "so this would be plain GRPO. Nothing was updated. This unsloth/TRL version changed how the loss is "
                "called; `sdpo-unsloth doctor` prints the versions: pin the tested ones or report it."
            )
        if trainer.accelerator.scaler is not None:
            return  # fp16: the grad scaler skips overflowing steps itself
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
        if grads and not torch.isfinite(torch.stack([g.detach().float().norm() for g in grads])).all():
            raise FloatingPointError(
                f"non-finite gradient at step {state.global_step + 1}: the optimizer step was refused and nothing was "
                "saved. Usual causes: a learning rate too high, fp16 overflow without a grad scaler, or a reward "
                "that returned inf/NaN. Lower learning_rate or resume from the last checkpoint."
            )

    def on_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        cfg = trainer.sdpo_config
        if not (cfg.enabled and cfg.teacher_mode == "ema"):
            return
        if trainer.accelerator.optimizer_step_was_skipped:
            trainer._metrics["train"]["sdpo/teacher_update_skipped"].append(1.0)
            return
        size = ema_update(
            trainer._peft_model(),
            teacher=cfg.teacher_adapter_name,
            student=STUDENT_ADAPTER,
            rate=cfg.teacher_update_rate,
        )
        trainer._metrics["train"]["sdpo/teacher_update_norm"].append(size)


def _prepare_model(model: Any, cfg: SDPOConfig, peft_config: Any) -> Any:
    """Student LoRA `default` (+ the teacher adapter in `ema` mode) on one shared base."""
    if isinstance(model, str):
        raise TypeError(
            "SDPOTrainer needs a loaded model; got the string "
            f"{model!r}. Load it with `model, tokenizer = sdpo_unsloth.load_model({model!r})`, or use "
            "sdpo_unsloth.train(model=...) which loads it for you."
        )
    needs_teacher = cfg.enabled and cfg.teacher_mode == "ema"
    return attach_lora(
        model, peft_config, teacher_adapter=cfg.teacher_adapter_name if needs_teacher else None
    )


class _SDPOMixin:
    sdpo_config: SDPOConfig

    def __init__(
        self,
        model: Any,
        reward_funcs: Any,
        args: Any = None,
        *,
        sdpo_config: SDPOConfig | None = None,
        peft_config: Any = None,
        **kwargs: Any,
    ):
        if sdpo_config is None:
            sdpo_config = SDPOConfig()
        if not isinstance(sdpo_config, SDPOConfig):
            raise TypeError(f"`sdpo_config` must be an SDPOConfig, got {type(sdpo_config).__name__}.")
        self.sdpo_config = sdpo_config
        self._sdpo_loss_calls = 0  # checked before the first optimizer step (a parent could bypass the loss)
        funcs = reward_funcs if isinstance(reward_funcs, list | tuple) else [reward_funcs]
        if not funcs:
            raise ValueError("`reward_funcs` is empty: pass at least one reward function.")
        self._checked_rewards = [
            CheckedReward(f, timeout=sdpo_config.reward_timeout)
            if callable(f) and not isinstance(f, nn.Module)
            else f
            for f in funcs
        ]
        check_trainer_inputs(args, kwargs.get("train_dataset"), kwargs.get("processing_class"))
        model = _prepare_model(model, sdpo_config, peft_config)
        super().__init__(model=model, reward_funcs=self._checked_rewards, args=args, **kwargs)
        if self.args.fp16:
            # TRL casts QLoRA adapters to bf16; fp16 AMP (a T4) cannot unscale bf16 gradients: keep them fp32.
            for param in self.model.parameters():
                if param.requires_grad and param.dtype != torch.float32:
                    param.data = param.data.float()
        if self.accelerator.num_processes > 1 and sdpo_config.enabled:
            raise NotImplementedError(
                "SDPOTrainer runs on one process (one GPU); prompt groups are not gathered across processes yet."
            )
        self.add_callback(_TeacherCallback(self))
        budget = sdpo_config.time_budget_seconds
        self.time_budget = TimeBudget(budget) if budget is not None else None  # stops with a checkpoint
        if self.time_budget is not None:
            self.add_callback(self.time_budget)

    # ------------------------------------------------------------------ helpers

    def _peft_model(self) -> Any:
        return self.accelerator.unwrap_model(self.model)

    def _render_teacher_prompt(self, reprompt: Reprompt) -> list[int]:
        tokenizer = self._tokenizer
        if isinstance(reprompt.prompt, str):
            return list(self.processing_class(text=[reprompt.prompt])["input_ids"][0])
        ids = tokenizer.apply_chat_template(
            reprompt.prompt,
            chat_template=self.chat_template,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            **self.chat_template_kwargs,
        )["input_ids"]
        return list(ids[0] if ids and isinstance(ids[0], list) else ids)

    def _fit_teacher_prompt(self, reprompt: Reprompt, source: Any) -> list[int]:
        """Tokenise; when over `max_reprompt_length`, cut the demonstration (never the template)."""
        cfg = self.sdpo_config
        demo = reprompt.demo
        ids = self._render_teacher_prompt(reprompt)
        for _ in range(3):
            excess = len(ids) - cfg.max_reprompt_length
            if excess <= 0 or not demo:
                break
            demo_ids = self._tokenizer(demo, add_special_tokens=False)["input_ids"]
            demo = self._tokenizer.decode(demo_ids[: max(0, len(demo_ids) - excess - 4)])
            reprompt = build_reprompt(
                source,
                demo=demo,
                feedback=reprompt.feedback,
                reprompt_template=cfg.reprompt_template,
                solution_template=cfg.solution_template,
                feedback_template=cfg.feedback_template,
            )
            ids = self._render_teacher_prompt(reprompt)
        return ids

    def _total_rewards(self, n: int) -> list[float]:
        """Weighted sum of the rewards per completion, skipping None as TRL does; NaN when all are None."""
        weights = self.reward_weights.tolist()
        totals: list[float | None] = [None] * n
        for weight, reward in zip(weights, self._checked_rewards, strict=True):
            if not isinstance(reward, CheckedReward) or len(reward.last_scores) != n:
                raise RuntimeError(
                    "SDPO needs each reward's scores for the current batch; reward models (nn.Module) are not "
                    "supported as SDPO rewards yet. Wrap the model in a function returning list[float]."
                )
            for i, score in enumerate(reward.last_scores):
                if score is not None:
                    totals[i] = (totals[i] or 0.0) + weight * score
        return [float("nan") if total is None else total for total in totals]

    # ------------------------------------------------------------------ hooks

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        output = super()._generate_and_score_completions(inputs)
        cfg = self.sdpo_config
        if not cfg.enabled:
            return output
        n = len(inputs)
        device = output["completion_ids"].device
        mode = "train" if self.model.training else "eval"
        completion_ids = output["completion_ids"]
        lengths = output["completion_mask"].sum(dim=1).tolist()
        texts = self._tokenizer.batch_decode(
            [row[:length] for row, length in zip(completion_ids.tolist(), lengths, strict=True)],
            skip_special_tokens=True,
        )
        rewards = self._total_rewards(n)
        feedback = combine_feedback([r for r in self._checked_rewards if isinstance(r, CheckedReward)])
        prompts = [example["prompt"] for example in inputs]
        plans = plan_reprompts(
            prompts,
            texts,
            [r if r == r else float("-inf") for r in rewards],  # NaN (unscorable) never succeeds
            feedback,
            group_size=self.num_generations if mode == "train" else self.num_generations_eval,
            success_threshold=cfg.success_reward_threshold,
            dont_reprompt_on_self_success=cfg.dont_reprompt_on_self_success,
            include_environment_feedback=cfg.include_environment_feedback,
            feedback_only_without_solution=cfg.environment_feedback_only_without_solution,
            remove_thinking=cfg.remove_thinking_from_demonstration,
            max_feedback_chars=cfg.max_feedback_chars,
            reprompt_template=cfg.reprompt_template,
            solution_template=cfg.solution_template,
            feedback_template=cfg.feedback_template,
        )
        pad_id = self._tokenizer.pad_token_id
        rows = []
        for plan, prompt in zip(plans, prompts, strict=True):
            if not plan.active:
                rows.append([pad_id])  # placeholder: no teacher forward for masked samples
                continue
            rows.append(self._fit_teacher_prompt(plan, prompt))
        width = max(len(r) for r in rows)
        ids = torch.full((n, width), pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
        active = torch.tensor([float(p.active) for p in plans])
        output["sdpo_teacher_prompt_ids"] = ids.to(device)
        output["sdpo_teacher_prompt_mask"] = mask.to(device)
        output["sdpo_sample_mask"] = active.to(device)
        output["sdpo_active_total"] = torch.full((n,), float(active.sum()), device=device)
        metrics = self._metrics[mode]
        metrics["sdpo/frac_with_demo"].append(sum(p.has_demo for p in plans) / n)
        metrics["sdpo/frac_with_feedback"].append(sum(p.has_feedback for p in plans) / n)
        metrics["sdpo/frac_masked"].append(1.0 - float(active.mean()))
        return output

    def _completion_hidden(
        self, model: Any, ids: torch.Tensor, mask: torch.Tensor, length: int
    ) -> torch.Tensor:
        """Final hidden states at the positions that predict the last `length` tokens: [B, L, H]."""
        decoder = model.get_base_model().get_decoder()
        hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        return hidden[:, -length - 1 : -1, :]

    @torch.no_grad()
    def _teacher_hidden(self, model: Any, inputs: dict[str, Any], rows: torch.Tensor) -> torch.Tensor:
        cfg = self.sdpo_config
        completion_ids = inputs["completion_ids"][rows]
        length = completion_ids.size(1)
        ids = torch.cat([inputs["sdpo_teacher_prompt_ids"][rows], completion_ids], dim=1)
        mask = torch.cat([inputs["sdpo_teacher_prompt_mask"][rows], inputs["completion_mask"][rows]], dim=1)
        mode = cfg.teacher_mode
        if mode == "live":
            return self._completion_hidden(model, ids, mask, length)
        if mode == "ema":
            with adapter_scope(model, cfg.teacher_adapter_name):
                return self._completion_hidden(model, ids, mask, length)
        with adapter_scope(model, None):
            frozen = self._completion_hidden(model, ids, mask, length)
        if mode == "frozen":
            return frozen
        # trust_region: (1-r) frozen + r live logits. lm_head is linear, so mixing hidden states is exact.
        live = self._completion_hidden(model, ids, mask, length)
        return torch.lerp(frozen, live, cfg.teacher_update_rate)

    def _lm_head(self, model: Any) -> tuple[torch.Tensor, torch.Tensor | None, float | None]:
        head = model.get_output_embeddings()
        weight = getattr(head, "weight", None)
        if weight is None or weight.ndim != 2:
            raise NotImplementedError(
                f"SDPO needs a linear output layer; {type(head).__name__} has no 2-D weight."
            )
        softcap = getattr(model.config, "final_logit_softcapping", None)
        if softcap is not None and self.sdpo_config.teacher_mode == "trust_region":
            raise NotImplementedError(
                "teacher_mode='trust_region' needs a linear lm_head (no logit softcapping)."
            )
        return weight, getattr(head, "bias", None), softcap

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> torch.Tensor:
        # Overridden here and not only in `_compute_loss`: unsloth's patched GRPOTrainer replaces TRL's
        # `compute_loss` with its own GRPO loss, which never calls `_compute_loss`.
        if not self.sdpo_config.enabled:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        if return_outputs:
            raise ValueError("SDPOTrainer does not support returning outputs")
        return self._sdpo_loss(model, inputs)

    def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor:
        if not self.sdpo_config.enabled:
            return super()._compute_loss(model, inputs)
        return self._sdpo_loss(model, inputs)

    def _sdpo_loss(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor:
        cfg = self.sdpo_config
        self._sdpo_loss_calls += 1
        mode = "train" if self.model.training else "eval"
        peft_model = self.accelerator.unwrap_model(model)
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        sample_mask = inputs["sdpo_sample_mask"]
        token_mask = mask * sample_mask[:, None]  # [B, L]
        blend = cfg.grpo_weight > 0
        rows = torch.ones_like(sample_mask, dtype=torch.bool) if blend else sample_mask > 0
        if not rows.any():
            self._metrics[mode]["sdpo/distill_loss"].append(0.0)
            return torch.zeros((), device=completion_ids.device, requires_grad=True)

        length = completion_ids.size(1)
        teacher_rows = rows & (sample_mask > 0)
        teacher_hidden = self._teacher_hidden(peft_model, inputs, teacher_rows)  # [B_t, L, H]
        ids = torch.cat([inputs["prompt_ids"][rows], completion_ids[rows]], dim=1)
        attention = torch.cat([inputs["prompt_mask"][rows], completion_mask[rows]], dim=1)
        student_hidden = self._completion_hidden(peft_model, ids, attention, length)  # [B_r, L, H]
        if blend:  # inactive rows score against themselves (zero divergence, masked out anyway)
            full = student_hidden.detach().clone()
            full[teacher_rows[rows]] = teacher_hidden.to(full.dtype)
            teacher_hidden = full
        row_mask = mask[rows]  # [B_r, L]
        selected = row_mask.bool()
        weight, bias, softcap = self._lm_head(peft_model)
        if student_hidden.size(-1) != weight.size(1) or teacher_hidden.size(-1) != weight.size(1):
            raise RuntimeError(
                f"the decoder returned a last dimension of {student_hidden.size(-1)} (teacher {teacher_hidden.size(-1)}) "
                f"where hidden states of size {weight.size(1)} were expected (vocabulary {weight.size(0)}): a patched "
                "forward returned logits instead of hidden states. Check `sdpo-unsloth doctor` for the versions."
            )
        terms = sdpo_loss.chunked_distill(
            student_hidden[selected],
            teacher_hidden[selected].to(student_hidden.dtype),
            weight,
            completion_ids[rows][selected],
            alpha=cfg.alpha,
            topk=cfg.distillation_topk,
            add_tail=cfg.distillation_add_tail,
            temperature=self.temperature,
            lm_head_bias=bias,
            logit_softcap=softcap,
            chunk_size=cfg.logit_chunk_size,
            need_divergence=not cfg.sampled_token,
        )
        old = inputs.get("old_per_token_logps")
        logp_old = old[rows][selected] if old is not None else terms.student_logp.detach()
        is_weight = sdpo_loss.importance_weight(terms.student_logp.detach(), logp_old, cfg.is_clip)
        if cfg.sampled_token:
            per_token_distill = sdpo_loss.sampled_token_surrogate(terms.student_logp, terms.teacher_logp)
        else:
            per_token_distill = terms.divergence
        per_token_distill = per_token_distill * is_weight

        def scatter(values: torch.Tensor) -> torch.Tensor:
            grid = torch.zeros(row_mask.shape, dtype=values.dtype, device=values.device)
            return grid.masked_scatter(selected, values)

        # Normalise by the active sequences of the whole generation batch, per optimizer step: with the
        # Trainer's division by GA steps this gives a gradient independent of how the batch is split.
        steps = self.args.steps_per_generation if mode == "train" else 1
        active_total = float(inputs["sdpo_active_total"][0])
        distill_mask = token_mask[rows]
        loss = sdpo_loss.sequence_mean_loss(
            scatter(per_token_distill), distill_mask, normalizer=max(active_total, 1.0) / steps
        )
        if blend:
            advantages = inputs["advantages"][rows]
            ratio = torch.exp(terms.student_logp - logp_old)
            adv = advantages[:, None].expand_as(row_mask)[selected]
            clipped = torch.clamp(ratio, 1 - self.epsilon_low, 1 + self.epsilon_high)
            per_token_grpo = -torch.minimum(ratio * adv, clipped * adv)
            grpo = sdpo_loss.sequence_mean_loss(
                scatter(per_token_grpo), row_mask, normalizer=row_mask.size(0)
            )
            loss = cfg.grpo_weight * grpo + (1 - cfg.grpo_weight) * loss
            self._metrics[mode]["sdpo/grpo_loss"].append(float(grpo.detach()))
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"the SDPO loss is {float(loss)} at step {self.state.global_step}; the step was refused and nothing "
                "was saved. Lower the learning rate, check the rewards, or train in fp32/bf16."
            )

        with torch.no_grad():
            weight_mask = distill_mask[selected].bool()  # [N]: tokens of samples with a teacher
            metrics = self._metrics[mode]
            if weight_mask.any():
                metrics["sdpo/distill_loss"].append(float(per_token_distill.detach()[weight_mask].mean()))
                if cfg.is_clip is not None:
                    raw = torch.exp(torch.clamp(terms.student_logp.detach() - logp_old, -20, 20))
                    metrics["sdpo/is_clip_frac"].append(
                        float((raw[weight_mask] > cfg.is_clip).float().mean())
                    )
                if terms.support_kl is not None:
                    metrics["sdpo/teacher_student_kl"].append(float(terms.support_kl[weight_mask].mean()))
        return loss

    # ------------------------------------------------------------------ checkpoints

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Save the student adapter only: the teacher is training state, not the model."""
        from peft import PeftModel

        model = self._peft_model()
        if not isinstance(model, PeftModel):
            return super()._save(output_dir, state_dict)
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model.save_pretrained(output_dir, selected_adapters=[STUDENT_ADAPTER])
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        cfg = self.sdpo_config
        if cfg.enabled and cfg.teacher_mode == "ema":
            # Written before the Trainer's files: trainer_state.json stays the last file of a complete checkpoint.
            from peft.utils import get_peft_model_state_dict
            from safetensors.torch import save_file

            folder = os.path.join(self._get_output_dir(trial), f"checkpoint-{self.state.global_step}")
            os.makedirs(folder, exist_ok=True)
            state = get_peft_model_state_dict(self._peft_model(), adapter_name=cfg.teacher_adapter_name)
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in state.items()},
                os.path.join(folder, TEACHER_FILE),
            )
            fault_point("save", self.state.global_step)  # test hook: a kill mid-save
        super()._save_checkpoint(model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        cfg = self.sdpo_config
        if not (cfg.enabled and cfg.teacher_mode == "ema"):
            return
        path = os.path.join(resume_from_checkpoint, TEACHER_FILE)
        peft_model = self._peft_model()
        if os.path.exists(path):
            from peft.utils import set_peft_model_state_dict
            from safetensors.torch import load_file

            result = set_peft_model_state_dict(
                peft_model, load_file(path), adapter_name=cfg.teacher_adapter_name
            )
            unexpected = getattr(result, "unexpected_keys", [])
            if unexpected:
                raise RuntimeError(
                    f"teacher adapter in {path} does not match this model: unexpected keys {unexpected[:3]}"
                )
        else:
            warnings.warn(
                f"{resume_from_checkpoint} has no teacher adapter ({TEACHER_FILE}); the EMA teacher restarts from the "
                "resumed student.",
                stacklevel=2,
            )
            copy_adapter(peft_model, STUDENT_ADAPTER, cfg.teacher_adapter_name)
        add_teacher_adapter(peft_model, cfg.teacher_adapter_name)  # re-freeze, keep the student active


SDPOTrainer = type(
    "SDPOTrainer",
    (AtomicCheckpoints, _SDPOMixin, trl.GRPOTrainer),
    {
        "__module__": __name__,
        "__doc__": """GRPOTrainer with self-distillation (SDPO). Same arguments as TRL's GRPOTrainer plus
    `sdpo_config` (an `SDPOConfig`) and `peft_config` (LoRA for a plain model; default rank 16).

    Example:
        trainer = SDPOTrainer(model=model, args=GRPOConfig(...), sdpo_config=SDPOConfig(),
                              processing_class=tokenizer, reward_funcs=[my_reward], train_dataset=ds)
        trainer.train()
    """,
    },
)
