"""`SDPOTrainer`: TRL's `GRPOTrainer` (unsloth's patched one on a GPU) with the SDPO loss.

Importing this module runs `bootstrap()` first, so the class below subclasses whatever
`trl.GRPOTrainer` is after unsloth patched it. Overridden hooks, each calling the pure modules:

    _generate_and_score_completions  + teacher prompts, demonstrations, feedback, sample mask
    compute_loss / _compute_loss     SDPO distillation (chunked top-K), optional GRPO blend; both,
                                     since unsloth's compute_loss never calls _compute_loss
    get_batch_samples / training_step  the step's window; its bookkeeping is the `steps.StepStats` mixin
Checkpoint hooks (the teacher adapter in checkpoints, never in exports) and the EMA/non-finite-step
callback are `teacher_state`; atomic checkpoints are `checkpoints.AtomicCheckpoints`.
"""

from __future__ import annotations

import warnings
from typing import Any

from .bootstrap import bootstrap

BACKEND = bootstrap()

import torch  # noqa: E402
import trl  # noqa: E402
from accelerate.utils import gather_object  # noqa: E402
from torch import nn  # noqa: E402
from transformers import DynamicCache  # noqa: E402
from transformers.cache_utils import DynamicLayer  # noqa: E402

from . import loss as sdpo_loss  # noqa: E402
from .adapters import (  # noqa: E402
    STUDENT_ADAPTER,
    adapter_is_initial,
    adapter_scope,
    add_teacher_adapter,
    checkpointing_off,
    dropout_off,
)
from .budget import TimeBudget  # noqa: E402
from .checkpoints import AtomicCheckpoints, GenerationBuffer, SettingsRecord, step_end_random  # noqa: E402
from .config import SDPOConfig  # noqa: E402
from .diagnostics import diagnostic_callbacks  # noqa: E402
from .heads import OutputHead, check_output_head, output_head  # noqa: E402
from .preconditions import check_trainer_inputs  # noqa: E402
from .rewards.protocol import CheckedReward, NoSignalWarning, checked_reward, combine_feedback  # noqa: E402
from .steps import StepStats, align_old_logps, hybrid_weights  # noqa: E402
from .teacher import Reprompt, build_reprompt, plan_reprompts  # noqa: E402
from .teacher_state import TeacherState, _prepare_model, _TeacherCallback  # noqa: E402

_UNSET = object()
# loss types whose normalisation the hybrid's GRPO term reproduces (`SDPOTrainer._grpo_term`)
HYBRID_LOSS_TYPES = ("dapo", "grpo", "bnpo", "dr_grpo")
REFERENCE_ADAPTER = "sdpo_reference"  # the KL anchor's frozen copy of an adapter trained before SDPO


GRPO_ONLY_OPTIONS = (
    "loss_type",
    "epsilon",
    "epsilon_high",
    "delta",
    "importance_sampling_level",
    "top_entropy_quantile",
    "off_policy_mask_threshold",
    "scale_rewards",
)


def _trim_left_padding(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded rows without the columns that are padding in every row.

    Teacher prompts are padded to the generation batch's longest one, often a row that this forward does not
    run (under the group hybrids, a sibling with a demonstration and distillation weight 0). The hidden states are
    the same up to float rounding: each row is contiguous and right-aligned, and RoPE scores depend on relative
    positions only.
    """
    width = ids.size(1) - int(mask.sum(dim=1).max()) if mask.numel() else 0
    return ids[:, width:], mask[:, width:]


def _warn_unused_grpo_options(args: Any, beta: float) -> None:
    """Pure SDPO has no GRPO term: say so once when GRPOConfig sets options only that term reads (with `beta` > 0
    the KL term is normalised as `loss_type`, which then has an effect)."""
    import dataclasses

    unused = [n for n in GRPO_ONLY_OPTIONS if not (beta > 0 and n == "loss_type")]
    defaults = {f.name: f.default for f in dataclasses.fields(type(args)) if f.name in unused}
    changed = [
        f"{n}={getattr(args, n)!r}" for n in unused if n in defaults and getattr(args, n) != defaults[n]
    ]
    if changed:
        from .train_config import default_hybrid

        warnings.warn(
            f"GRPOConfig sets {', '.join(changed)}, which only GRPO's loss reads; pure SDPO (grpo_weight=0) has no "
            f"GRPO term, so they have no effect. For them to apply use {default_hybrid()}, or plain GRPO "
            "(SDPOConfig(enabled=False)).",
            stacklevel=3,
        )


def _reference_adapter(model: Any) -> str | None:
    """The KL anchor's policy (GRPOConfig.beta): the student as it starts. A fresh LoRA adds nothing, so the base
    with adapters disabled is that policy (None); an adapter trained before gets a frozen copy, as TRL's "ref"."""
    if adapter_is_initial(model, STUDENT_ADAPTER):
        return None
    add_teacher_adapter(model, REFERENCE_ADAPTER)
    return REFERENCE_ADAPTER


class _SDPOMixin(StepStats, TeacherState, GenerationBuffer, SettingsRecord):
    sdpo_config: SDPOConfig
    # One input kind for the compiled decoder blocks from the first step on (see `_completion_hidden`).
    stable_shapes: bool = True
    # Teacher rows with the same reprompt run it once (`_teacher_forward`); transformers backend only.
    share_teacher_prompts: bool = True

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
        # GRPOConfig.beta: SDPO's loss adds TRL's KL term itself (`_sdpo_loss`), against the initial policy scored
        # in the loss, so TRL (or unsloth) is shown beta 0 and neither loads a reference model nor scores one.
        beta = float(getattr(args, "beta", 0.0) or 0.0) if sdpo_config.enabled and args is not None else 0.0
        if beta < 0:
            raise ValueError(f"GRPOConfig.beta must be >= 0 (the KL penalty's weight), got {beta}.")
        self.reference_kl_beta = beta
        anchor = sdpo_config.distill_anchor if sdpo_config.enabled else 0.0
        # Both KL weights add one term, normalised as TRL's loss_type: refuse a loss_type it does not reproduce.
        for name, weight in (("GRPOConfig.beta", beta), ("SDPOConfig.distill_anchor", anchor)):
            if weight and args is not None and getattr(args, "loss_type", "dapo") not in HYBRID_LOSS_TYPES:
                raise ValueError(
                    f"{name}={weight} with loss_type={args.loss_type!r}: SDPO's KL term is normalised as TRL's "
                    f"loss_type {', '.join(HYBRID_LOSS_TYPES)}. Use one of those, or {name.split('.')[1]}=0.0."
                )
        if sdpo_config.enabled and args is not None:
            entropy = {
                "entropy_coef": (getattr(args, "entropy_coef", 0.0), 0.0),
                "use_adaptive_entropy": (getattr(args, "use_adaptive_entropy", False), False),
            }
            for name, (value, off) in entropy.items():
                if value != off:
                    raise ValueError(
                        f"GRPOConfig.{name}={value!r}: TRL's entropy bonus is not part of SDPO's loss (pure SDPO or "
                        f"the hybrid), so it would be ignored. Use {name}={off!r}, or plain GRPO "
                        "(SDPOConfig(enabled=False)) for the entropy bonus."
                    )
        if sdpo_config.enabled and sdpo_config.grpo_weight == 0 and args is not None:
            _warn_unused_grpo_options(args, max(beta, anchor))
        if sdpo_config.distill_anchor > 0 and not sdpo_config.distils:
            warnings.warn(
                f"SDPOConfig.distill_anchor={sdpo_config.distill_anchor} has no effect: "
                + (
                    "SDPO is off (enabled=False), so nothing is distilled; for a KL penalty on plain GRPO use "
                    "GRPOConfig.beta."
                    if not sdpo_config.enabled
                    else "grpo_weight=1 with hybrid_mode='fixed' distils no sample; use GRPOConfig.beta for a "
                    "penalty on every sample, or a hybrid_mode that distils (e.g. 'per_group')."
                ),
                stacklevel=2,
            )
        if sdpo_config.enabled and sdpo_config.grpo_weight > 0 and args is not None:
            unsupported = {
                "loss_type": (getattr(args, "loss_type", "dapo"), HYBRID_LOSS_TYPES),
                "importance_sampling_level": (
                    getattr(args, "importance_sampling_level", "token"),
                    ("token",),
                ),
                "top_entropy_quantile": (getattr(args, "top_entropy_quantile", 1.0), (1.0,)),
                "delta": (getattr(args, "delta", None), (None,)),
                "off_policy_mask_threshold": (getattr(args, "off_policy_mask_threshold", None), (None,)),
            }
            for name, (value, allowed) in unsupported.items():
                if value not in allowed:
                    raise ValueError(
                        f"GRPOConfig.{name}={value!r} is not supported by the SDPO hybrid (grpo_weight="
                        f"{sdpo_config.grpo_weight}), whose GRPO term is TRL's clipped surrogate normalised as "
                        f"loss_type {', '.join(HYBRID_LOSS_TYPES)}. Use {name}={allowed[0]!r}, or plain GRPO "
                        "(SDPOConfig(enabled=False)) for that option."
                    )
        self.sdpo_config = sdpo_config
        self._sdpo_loss_calls = 0  # checked before the first optimizer step (a parent could bypass the loss)
        self._sdpo_window: tuple[int, int] | None = None  # (first micro-batch, micro-batches) of this step
        self._sdpo_stats: dict[str, list[float]] = {}  # per-step sums of token metrics: name -> [sum, count]
        self.sdpo_last_terms: dict[str, torch.Tensor] | None = None  # the last micro-batch's per-token terms
        funcs = reward_funcs if isinstance(reward_funcs, list | tuple) else [reward_funcs]
        if not funcs:
            raise ValueError("`reward_funcs` is empty: pass at least one reward function.")
        self._checked_rewards = [
            checked_reward(f, timeout=sdpo_config.reward_timeout)
            if callable(f) and not isinstance(f, nn.Module)
            else f
            for f in funcs
        ]
        if len(funcs) > 1:  # None from one reward where another scores is TRL's multi-task pattern
            for reward in self._checked_rewards:
                if isinstance(reward, CheckedReward):
                    reward.warn_all_none = False
        self._warned_no_signal = False
        self._warned_reprompt_budget = False
        check_trainer_inputs(args, kwargs.get("train_dataset"), kwargs.get("processing_class"))
        model, self._teacher_adapter = _prepare_model(model, sdpo_config, peft_config)
        self._reference_adapter = _reference_adapter(model) if beta or anchor else None
        if beta:
            args.beta = 0.0  # restored below: the user's config keeps its value
        try:
            super().__init__(model=model, reward_funcs=self._checked_rewards, args=args, **kwargs)
        finally:
            if beta:
                args.beta = beta
        if self.args.fp16:
            # TRL casts QLoRA adapters to bf16; fp16 AMP (a T4) cannot unscale bf16 gradients: keep them fp32.
            for param in self.model.parameters():
                if param.requires_grad and param.dtype != torch.float32:
                    param.data = param.data.float()
        if self.accelerator.num_processes > 1 and BACKEND.name == "unsloth":
            raise NotImplementedError(
                f"{self.accelerator.num_processes} processes on the unsloth backend: SDPOTrainer runs unsloth on one "
                "GPU only (its patched GRPO trainer under several processes is not verified with SDPO's loss). For "
                "several GPUs launch the transformers backend, 4-bit QLoRA included: "
                "SDPO_UNSLOTH_BACKEND=transformers accelerate launch --num_processes N your_script.py; see "
                "docs/scaling.md."
            )
        if sdpo_config.enabled:
            self._head = self._checked_head()
        self.add_callback(_TeacherCallback(self))
        self.add_callback(step_end_random(self))  # for a checkpoint written after a reward error
        budget = sdpo_config.time_budget_seconds
        self.time_budget = TimeBudget(budget) if budget is not None else None  # stops with a checkpoint
        if self.time_budget is not None:
            self.add_callback(self.time_budget)
        for callback in diagnostic_callbacks(self):  # per-token page and table, no-op warnings
            self.add_callback(callback)

    # ------------------------------------------------------------------ helpers

    def _peft_model(self) -> Any:
        return self.accelerator.unwrap_model(self.model)

    def _checked_head(self) -> OutputHead:
        cfg = self.sdpo_config
        model = self._peft_model()
        head = output_head(model)
        if head.softcap is not None and cfg.teacher_mode == "trust_region":
            raise NotImplementedError(
                f"teacher_mode='trust_region' mixes the initial and live teachers before the output layer, which "
                f"is exact only without logit softcapping; the {model.config.model_type} model softcaps its logits. "
                "Use teacher_mode='ema' or 'frozen'."
            )
        if BACKEND.name == "transformers":  # unsloth's patched forward may return hidden states as logits
            vocab = head.weight.shape[0]
            # In training mode (dropout off): an eval-mode forward makes bitsandbytes repack 4-bit weights
            # for CPU inference, after which they cannot be trained.
            was_training = model.training
            model.train()
            try:
                with dropout_off(model):
                    check_output_head(
                        model,
                        head,
                        lambda ids: self._completion_hidden(
                            model, ids, torch.ones_like(ids), ids.shape[1] - 1
                        ),
                        [i % vocab for i in range(1, 9)],
                    )
            finally:
                model.train(was_training)
        return head

    def _render_teacher_prompt(self, reprompt: Reprompt, tools: list | None = None) -> list[int]:
        tokenizer = self._tokenizer
        if isinstance(reprompt.prompt, str):
            return list(self.processing_class(text=[reprompt.prompt])["input_ids"][0])
        ids = tokenizer.apply_chat_template(
            reprompt.prompt,
            tools=tools or None,  # as TRL renders the student's prompt (None: no tool boilerplate for [])
            chat_template=self.chat_template,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            **self.chat_template_kwargs,
        )["input_ids"]
        return list(ids[0] if ids and isinstance(ids[0], list) else ids)

    def _sample_tools(self, n: int) -> list[list | None]:
        """The tool schemas TRL rendered into each of this process's `n` student prompts: its environment's
        (`environment_factory`), else the trainer's `tools`; the teacher sees the same."""
        envs = getattr(self, "_batch_environments", None)
        if getattr(self, "environment_factories", None) is not None and envs is not None and len(envs) == n:
            return [self._env_tools[name] for name in envs]
        return [getattr(self, "tools", None)] * n

    def _fit_teacher_prompt(
        self, reprompt: Reprompt, source: Any, tools: list | None = None
    ) -> list[int] | None:
        """Tokenise (with the sample's tool schemas, as its student prompt); when over `max_reprompt_length`, cut
        the demonstration (never the template). None when the demonstration had to be cut to nothing: the
        template and the question alone fill the budget, and 'Correct solution:' followed by nothing teaches
        nothing."""
        cfg = self.sdpo_config
        demo = reprompt.demo
        ids = self._render_teacher_prompt(reprompt, tools)
        given = reprompt
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
            ids = self._render_teacher_prompt(reprompt, tools)
        if given.demo is not None and given.demo.strip() and not (demo or "").strip():
            return None
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
        if n and len(weights) > 1 and all(total is None for total in totals) and not self._warned_no_signal:
            self._warned_no_signal = True
            names = ", ".join(f"'{reward.__name__}'" for reward in self._checked_rewards)
            warnings.warn(
                f"no reward ({names}) scored any of the {n} completions of a generation batch (None from each): "
                "they give no training signal. Return 0.0 for a wrong answer and None only for a completion a "
                "reward cannot judge. (Said once.)",
                NoSignalWarning,
                stacklevel=2,
            )
        return [float("nan") if total is None else total for total in totals]

    # ------------------------------------------------------------------ per-step bookkeeping

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> Any:
        # Called once per optimizer step, before its micro-batches: the window the loss is normalised over.
        self._sdpo_window = (self._step, num_batches)
        return super().get_batch_samples(epoch_iterator, num_batches, device)

    def training_step(
        self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        window = self._sdpo_window
        if (
            self.sdpo_config.enabled
            and self.accelerator.num_processes > 1
            and window is not None
            and self._step == window[0] + window[1]  # TRL counted this micro-batch: the step's last one
        ):
            self._average_gradients()
        return loss

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
        rewards = [r if r == r else float("-inf") for r in self._total_rewards(n)]  # NaN never succeeds
        # A demonstration is a real answer: under `mask_truncated_completions` TRL zeroes the mask of a
        # completion cut at the token budget, so it has no tokens left and never demonstrates.
        can_demonstrate = [length > 0 for length in lengths]
        weights = self.reward_weights.tolist()
        feedback = combine_feedback(
            [
                r
                for r, w in zip(self._checked_rewards, weights, strict=True)
                if isinstance(r, CheckedReward) and w != 0  # a reward weighted 0 does not teach
            ]
        )
        if not feedback:
            feedback = [""] * n
        prompts = [example["prompt"] for example in inputs]
        # A prompt's group can span processes: plan on the whole generation batch (process-major, as TRL
        # lays it out for the advantages), then keep this process's rows.
        group = (prompts, texts, rewards, feedback, can_demonstrate)
        if self.accelerator.num_processes > 1:
            group = tuple(gather_object(list(column)) for column in group)
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        all_plans = plan_reprompts(
            *group[:4],
            group_size=group_size,
            can_demonstrate=group[4],
            **cfg.reprompt_options(),
        )
        start = self.accelerator.process_index * n if self.accelerator.num_processes > 1 else 0
        plans = all_plans[start : start + n]
        grpo_weights, distill_weights = hybrid_weights(
            group[2],
            group_size,
            weight=cfg.grpo_weight,
            mode=cfg.hybrid_mode,
            success_threshold=cfg.success_reward_threshold,
        )
        output["sdpo_grpo_weight"] = torch.tensor(
            grpo_weights[start : start + n], dtype=torch.float32, device=device
        )
        output["sdpo_distill_weight"] = torch.tensor(
            distill_weights[start : start + n], dtype=torch.float32, device=device
        )
        # For the per-token diagnostics: TRL shuffles the batch before splitting it, so rows carry their index.
        # Training's only: an evaluation between two steps that share a generation batch must not replace them.
        output["sdpo_sample_index"] = torch.arange(n, device=device)
        if mode == "train":
            self.sdpo_last_plans = (plans, rewards)
        active = [plan.active and length > 0 for plan, length in zip(plans, lengths, strict=True)]
        if cfg.grpo_weight > 0 and cfg.hybrid_mode == "failures":  # a success is not distilled: no teacher
            active = [a and d > 0 for a, d in zip(active, distill_weights[start : start + n], strict=True)]
        pad_id = self._tokenizer.pad_token_id
        rows = []
        tools = self._sample_tools(n)
        dropped = 0
        for i, (plan, prompt, row_tools) in enumerate(zip(plans, prompts, tools, strict=True)):
            # Placeholder for a sample without a teacher: it gets no loss and no teacher forward.
            row = self._fit_teacher_prompt(plan, prompt, row_tools) if active[i] else [pad_id]
            if row is None:  # no room for the demonstration: the sample's own feedback alone, else no teacher
                dropped += 1
                plans[i] = plan_reprompts(
                    [prompt],
                    [texts[i]],
                    [float("-inf")],
                    [feedback[i]],
                    group_size=1,
                    can_demonstrate=[False],
                    **cfg.reprompt_options(),
                )[0]
                active[i] = plans[i].active
                row = self._fit_teacher_prompt(plans[i], prompt, row_tools) if active[i] else [pad_id]
            rows.append(row)
        if dropped and not self._warned_reprompt_budget:
            self._warned_reprompt_budget = True
            warnings.warn(
                f"{dropped} of {n} teacher prompts had no room for their demonstration: the question and the "
                f"reprompt template alone fill max_reprompt_length={cfg.max_reprompt_length} tokens. Those samples "
                "use their own feedback, or get no teacher. Raise SDPOConfig.max_reprompt_length. (Said once.)",
                stacklevel=2,
            )
        width = max(len(r) for r in rows)
        ids = torch.full((n, width), pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
        output["sdpo_teacher_prompt_ids"] = ids.to(device)
        output["sdpo_teacher_prompt_mask"] = mask.to(device)
        output["sdpo_sample_mask"] = torch.tensor(active, dtype=torch.float32, device=device)
        # The rows as the loss sees them (a demonstration with no room already replaced), over all processes;
        # distilled: a teacher and a distillation weight (the hybrid gives GRPO the rest).
        rows_seen = [
            (p.has_demo, p.has_feedback, a, a and d > 0)
            for p, a, d in zip(plans, active, distill_weights[start : start + n], strict=True)
        ]
        if self.accelerator.num_processes > 1:
            rows_seen = gather_object(rows_seen)
        metrics = self._metrics[mode]
        for i, name in enumerate(("frac_with_demo", "frac_with_feedback", "frac_masked", "frac_distilled")):
            share = sum(row[i] for row in rows_seen) / len(rows_seen)
            metrics[f"sdpo/{name}"].append(1.0 - share if name == "frac_masked" else share)
        return output

    def _completion_hidden(
        self, model: Any, ids: torch.Tensor, mask: torch.Tensor, length: int
    ) -> torch.Tensor:
        """Final hidden states at the positions that predict the last `length` tokens: [B, L, H].

        With `stable_shapes` (the default) the compiled decoder blocks of unsloth see one kind of input from the
        first step on: a micro-batch without padding gets one padded column on the left (so an attention mask is
        always passed, never dropped), and a single row is run as two (torch.compile specialises a batch of 1).
        Both are exact: the pad is masked and RoPE scores depend on relative positions only; the copy's output
        is dropped. Without them, the first padded micro-batch or single teacher row compiled new graphs
        mid-run (benchmarks/investigations/compile_count.py).
        """
        rows = ids.size(0)
        if self.stable_shapes:
            if bool(mask.all()):
                pad = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else 0
                ids = torch.cat([ids.new_full((rows, 1), pad), ids], dim=1)
                mask = torch.cat([mask.new_zeros((rows, 1)), mask], dim=1)
            if rows == 1:
                ids, mask = ids.expand(2, -1), mask.expand(2, -1)
        decoder = model.get_base_model().get_decoder()
        # Unsloth's fast decoder drops the attention mask in training mode unless told to keep it (exact
        # only for right padding; our rows are left-padded). Its own distillation trainers do the same.
        previous = decoder.__dict__.get("_unsloth_keep_padding_mask", _UNSET)  # unsloth may have set it
        decoder._unsloth_keep_padding_mask = True
        try:
            hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        finally:
            if previous is _UNSET:
                del decoder._unsloth_keep_padding_mask
            else:
                decoder._unsloth_keep_padding_mask = previous
        return hidden[:rows, -length - 1 : -1, :]

    @torch.no_grad()
    def _teacher_hidden(self, model: Any, inputs: dict[str, Any], rows: torch.Tensor) -> torch.Tensor:
        """The teacher's final hidden states on its prompt + the student's completion: [B_t, L, H].

        Dropout is off (the targets are deterministic); the student adapter is restored afterwards.
        """
        cfg = self.sdpo_config
        prompt = _trim_left_padding(
            inputs["sdpo_teacher_prompt_ids"][rows], inputs["sdpo_teacher_prompt_mask"][rows]
        )
        completion = (inputs["completion_ids"][rows], inputs["completion_mask"][rows])
        mode = cfg.teacher_mode
        with dropout_off(model):
            if mode == "live":
                return self._teacher_forward(model, prompt, completion)
            # ema: the EMA adapter. frozen / trust_region: the initial policy, i.e. a frozen copy of an
            # adapter that was trained before SDPO, or the base with adapters disabled.
            with adapter_scope(model, self._teacher_adapter):
                initial = self._teacher_forward(model, prompt, completion)
            if mode != "trust_region":
                return initial
            # (1-r) initial + r live logits; lm_head is linear (softcap refused), so mixing hidden states is exact.
            live = self._teacher_forward(model, prompt, completion)
            return torch.lerp(initial, live, cfg.teacher_update_rate)

    def _teacher_forward(
        self,
        model: Any,
        prompt: tuple[torch.Tensor, torch.Tensor],
        completion: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """Final hidden states predicting the completion tokens after the teacher prompt: [B_t, L, H].

        Siblings that failed next to one success see the same reprompt (question + that demonstration), and
        feedback that only names the answer is the same for a whole group: such a prompt is run once
        (`_shared_prompt_forward`). Otherwise, and on the unsloth backend, whose compiled decoder is run in the
        single pass it was compiled for, one pass over prompt + completion per row.
        """
        if self.share_teacher_prompts and BACKEND.name == "transformers":
            shared = self._shared_prompt_forward(model, prompt, completion)
            if shared is not None:
                return shared
        (prompt_ids, prompt_mask), (completion_ids, completion_mask) = prompt, completion
        ids = torch.cat([prompt_ids, completion_ids], dim=1)
        mask = torch.cat([prompt_mask, completion_mask], dim=1)
        return self._completion_hidden(model, ids, mask, completion_ids.size(1))

    def _shared_prompt_forward(
        self,
        model: Any,
        prompt: tuple[torch.Tensor, torch.Tensor],
        completion: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor | None:
        """`_teacher_forward` with each distinct prompt run once: its KV cache is repeated to its rows and only
        the completions run on top of it (same positions, same masked pads as the single pass, so the same
        values up to float rounding). None when every prompt is distinct, or the decoder's cache is not plain
        full attention (sliding-window, linear-attention or recurrent layers: Gemma 2, Falcon-H1).
        """
        (prompt_ids, prompt_mask), (completion_ids, completion_mask) = prompt, completion
        unique, inverse = torch.unique(
            torch.cat([prompt_ids, prompt_mask], dim=1), dim=0, return_inverse=True
        )
        if unique.size(0) == prompt_ids.size(0):
            return None
        decoder = model.get_base_model().get_decoder()
        cache = DynamicCache(config=decoder.config)
        if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
            return None
        width = prompt_ids.size(1)
        with checkpointing_off(decoder):  # a checkpointed layer in training mode would drop the cache
            last = decoder(
                input_ids=unique[:, :width],
                attention_mask=unique[:, width:],
                past_key_values=cache,
                use_cache=True,
            ).last_hidden_state[:, -1:]  # [U, 1, H]: predicts each completion's first token
            cache.batch_select_indices(inverse)
            tail = decoder(
                input_ids=completion_ids,
                attention_mask=torch.cat([prompt_mask, completion_mask], dim=1),
                past_key_values=cache,
                use_cache=True,
            ).last_hidden_state  # [B_t, L, H]
        return torch.cat([last[inverse], tail[:, : completion_ids.size(1) - 1]], dim=1)

    def _grpo_term(self, per_token: torch.Tensor, mask: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        """The hybrid's GRPO term, normalised as TRL's GRPO loss of the configured `loss_type` (so that
        grpo_weight 1 gives TRL's update): "dapo" (TRL's default) divides the token sum by the tokens of the
        accumulation window, "bnpo" by the micro-batch's tokens, "dr_grpo" by rows x max_completion_length
        (both per accumulation step), "grpo" averages the sequences' token means over the micro-batch's rows
        (a row without a completion token, e.g. one cut off under `mask_truncated_completions`, counts as 0),
        per accumulation step. `per_token` and `mask` are [B_r, L] over this micro-batch's non-empty rows.
        """
        accumulation = (
            getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
            if self.model.training
            else 1
        )
        if self.loss_type == "grpo":
            rows = inputs["completion_ids"].size(0) * accumulation
            return sdpo_loss.sequence_mean_loss(per_token, mask, normalizer=float(rows))
        masked = (per_token * mask).sum()
        if self.loss_type == "bnpo":
            return masked / mask.sum().clamp(min=1.0) / accumulation
        if self.loss_type == "dr_grpo":
            return masked / (inputs["completion_ids"].size(0) * self.max_completion_length) / accumulation
        if "num_items_in_batch" not in inputs:  # a patched trainer without TRL's window token count
            return masked / mask.sum().clamp(min=1.0) / accumulation
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes  # "dapo"
        if self.model.training:
            normalizer = normalizer * accumulation / self.args.steps_per_generation
        return masked / normalizer

    def _zero_loss(self, model: Any) -> torch.Tensor:
        """A zero loss connected to every trainable parameter (their gradients are 0, not missing)."""
        return sum((p.sum() * 0.0 for p in model.parameters() if p.requires_grad), torch.zeros(()))

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
        """One micro-batch's share of the optimizer step's loss.

            L_SDPO = sum over sequences i with a teacher of [d_i token mean of w_t D(p_t, q_t)] / n_teacher
            L_GRPO = TRL's clipped surrogate weighted by g_i per sequence, normalised as TRL's `loss_type`
                     ("grpo": sum over sequences of token means / (rows x accumulation); "dapo", TRL's
                     default: token sum / the window's tokens; see `_grpo_term`)
            loss   = L_GRPO + L_SDPO     (without the hybrid: g_i = 0, d_i = 1)
                     + the KL penalty to the initial policy, k_i x k3 normalised as L_GRPO, with k_i =
                       GRPOConfig.beta + SDPOConfig.distill_anchor if sequence i is distilled, else beta

        (g_i, d_i) per `hybrid_mode` (`steps.hybrid_weights`): "fixed" (w, 1 - w) for every sequence;
        "per_group" that in prompt groups whose rewards differ and (0, 1) in the others; "failed_groups" as
        "per_group" but (0, 0) for the successes of a group that all succeeded (they keep their teacher, so the
        normaliser is per_group's); "failures" (w, 1) for failed sequences and (w, 0) for successes, which then
        have no teacher.

        with n_teacher taken over the whole optimizer step (`_window_counts`), so any split into
        micro-batches gives the same update.
        """
        cfg = self.sdpo_config
        self._sdpo_loss_calls += 1
        mode = "train" if self.model.training else "eval"
        peft_model = self.accelerator.unwrap_model(model)
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        has_teacher = inputs["sdpo_sample_mask"] > 0  # [B]
        hybrid = cfg.grpo_weight > 0
        beta = self.reference_kl_beta
        # every row with a completion token has a loss, a teacher or not (the KL term's normaliser counts them all)
        dense = hybrid or beta > 0 or cfg.distill_anchor > 0
        if hybrid:  # a sequence weighted 1 on GRPO distils nothing: no teacher forward for it
            has_teacher = has_teacher & (inputs["sdpo_distill_weight"] > 0)
        rows = (mask.sum(dim=1) > 0) & (True if dense else has_teacher)  # [B]
        n_teacher = self._window_counts(inputs)
        if not rows.any():
            self._end_micro_batch(mode)
            return self._zero_loss(model)

        length = completion_ids.size(1)
        teacher_rows = has_teacher[rows]  # [B_r]: which of the rows have a teacher
        teacher_hidden = None
        if teacher_rows.any():
            teacher_hidden = self._teacher_hidden(peft_model, inputs, rows & has_teacher)  # [B_t, L, H]
        ids = torch.cat([inputs["prompt_ids"][rows], completion_ids[rows]], dim=1)
        attention = torch.cat([inputs["prompt_mask"][rows], completion_mask[rows]], dim=1)
        student_hidden = self._completion_hidden(peft_model, ids, attention, length)  # [B_r, L, H]
        if dense:  # rows without a teacher score against themselves: zero divergence and gradient
            full = student_hidden.detach().clone()
            if teacher_hidden is not None:
                full[teacher_rows] = teacher_hidden.to(full.dtype)
            teacher_hidden = full
        row_mask = mask[rows]  # [B_r, L]
        selected = row_mask.bool()
        head = self._head
        if student_hidden.size(-1) != head.weight.size(1) or teacher_hidden.size(-1) != head.weight.size(1):
            raise RuntimeError(
                f"the decoder returned a last dimension of {student_hidden.size(-1)} (teacher {teacher_hidden.size(-1)}) "
                f"where hidden states of size {head.weight.size(1)} were expected (vocabulary {head.weight.size(0)}): a "
                "patched forward returned logits instead of hidden states. Check `sdpo-unsloth doctor` for the versions."
            )
        terms = sdpo_loss.chunked_distill(
            student_hidden[selected],
            teacher_hidden[selected].to(student_hidden.dtype),
            head.weight,
            completion_ids[rows][selected],
            alpha=cfg.alpha,
            topk=cfg.distillation_topk,
            add_tail=cfg.distillation_add_tail,
            temperature=head.temperature(self.temperature),
            lm_head_bias=head.bias,
            logit_softcap=head.softcap,
            chunk_size=cfg.logit_chunk_size,
            need_divergence=not cfg.sampled_token,
        )
        student_logp = terms.student_logp.detach()  # [N]
        old = inputs.get("old_per_token_logps")
        logp_old = align_old_logps(old, inputs)[rows][selected] if old is not None else student_logp
        is_weight = sdpo_loss.importance_weight(student_logp, logp_old, cfg.is_clip)  # [N]
        rollout = inputs.get("importance_sampling_ratio")  # vLLM: sampler -> trainer correction
        rollout = rollout.expand_as(mask)[rows][selected] if rollout is not None else 1.0
        if cfg.sampled_token:
            per_token_distill = sdpo_loss.sampled_token_surrogate(terms.student_logp, terms.teacher_logp)
            divergence = student_logp - terms.teacher_logp  # single-sample estimate of KL(p || q)
        else:
            per_token_distill = terms.divergence
            divergence = terms.divergence.detach()
        per_token_distill = per_token_distill * is_weight * rollout

        def scatter(values: torch.Tensor) -> torch.Tensor:  # [N] -> [B_r, L]
            grid = torch.zeros(row_mask.shape, dtype=values.dtype, device=values.device)
            return grid.masked_scatter(selected, values)

        distill_mask = row_mask * teacher_rows[:, None]  # [B_r, L]: tokens of sequences with a teacher
        distill_grid = scatter(per_token_distill)
        if (
            hybrid
        ):  # per sequence: g_i * GRPO_i + d_i * SDPO_i (`hybrid_weights`: d_i = 1 - g_i but for successes)
            mix = inputs["sdpo_grpo_weight"][rows][:, None].to(distill_grid.dtype)  # [B_r, 1]
            distill_grid = distill_grid * inputs["sdpo_distill_weight"][rows][:, None].to(distill_grid.dtype)
        loss = sdpo_loss.sequence_mean_loss(distill_grid, distill_mask, normalizer=max(n_teacher, 1.0))
        if hybrid:
            ratio = torch.exp(terms.student_logp - logp_old)
            advantages = inputs["advantages"][rows][:, None].expand_as(row_mask)[selected]
            clipped = torch.clamp(ratio, 1 - self.epsilon_low, 1 + self.epsilon_high)
            grpo_grid = scatter(-torch.minimum(ratio * advantages, clipped * advantages) * rollout)
            loss = loss + self._grpo_term(grpo_grid * mix, row_mask, inputs)
            self._add_stat("sdpo/grpo_loss", float(self._grpo_term(grpo_grid.detach(), row_mask, inputs)))
        # TRL's KL penalty, weight x k3(p, p_ref) per completion token, normalised as GRPO's loss: GRPOConfig.beta
        # on every row, SDPOConfig.distill_anchor on the rows distilled; the reference scores only rows weighted.
        kl_weight = beta + cfg.distill_anchor * teacher_rows.to(terms.student_logp.dtype)  # [B_r], fp32
        anchored = kl_weight > 0  # [B_r]
        if anchored.any():
            on = anchored[:, None].expand_as(selected)[selected]  # [N]: tokens of anchored rows
            with torch.no_grad(), dropout_off(peft_model), adapter_scope(peft_model, self._reference_adapter):
                reference_hidden = self._completion_hidden(
                    peft_model, ids[anchored], attention[anchored], length
                )
            reference_logp = sdpo_loss.sampled_logps(
                reference_hidden[selected[anchored]],
                head.weight,
                completion_ids[rows][anchored][selected[anchored]],
                temperature=head.temperature(self.temperature),
                lm_head_bias=head.bias,
                logit_softcap=head.softcap,
                chunk_size=cfg.logit_chunk_size,
            )
            kl = sdpo_loss.reference_kl(terms.student_logp[on], reference_logp)  # [N_a]
            if getattr(self.args, "use_bias_correction_kl", False):
                kl = kl * torch.exp(terms.student_logp[on] - logp_old[on])
            per_token = torch.zeros_like(terms.student_logp).masked_scatter(on, kl)  # [N]
            weights = kl_weight[:, None].expand_as(selected)[selected]  # [N]
            loss = loss + self._grpo_term(scatter(weights * per_token), row_mask, inputs)
            self._add_stat("kl", float(kl.detach().sum()), float(on.sum()))
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"the SDPO loss is {float(loss)} at step {self.state.global_step}; the step was refused and nothing "
                "was saved. Lower the learning rate, check the rewards, or train in fp32/bf16."
            )

        with torch.no_grad():
            taught = distill_mask[selected].bool()  # [N]: tokens of samples with a teacher
            count = float(taught.sum())
            self._add_stat("sdpo/distill_loss", float((divergence * is_weight)[taught].sum()), count)
            if cfg.is_clip is not None:
                raw = torch.exp(torch.clamp(student_logp - logp_old, -20, 20))
                self._add_stat("sdpo/is_clip_frac", float((raw[taught] > cfg.is_clip).sum()), count)
            if terms.support_kl is not None:
                self._add_stat("sdpo/teacher_student_kl", float(terms.support_kl[taught].sum()), count)
            if mode == "train":  # for the per-token diagnostics, which show training's micro-batches
                self.sdpo_last_terms = {
                    "rows": rows.nonzero().flatten(),
                    "mask": distill_mask,
                    "student_logp": scatter(student_logp),
                    "teacher_logp": scatter(terms.teacher_logp),
                }
        self._end_micro_batch(mode)
        return loss


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
