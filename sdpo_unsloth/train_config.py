"""The configs a `train()` run trains with: `SDPOConfig` and TRL's `GRPOConfig` built from the flat knobs, a
config object the caller passed and the kit defaults, with the precision and optimizer that suit the device;
and which checkpoint a resumed run starts from.

Precedence: a flat knob you set > the config object you passed > `DEFAULTS` (+ the device's settings).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .bootstrap import bf16_supported
from .checkpoints import checkpoint_damage, last_complete_checkpoint, previous_checkpoint
from .config import HYBRIDS, SDPOConfig
from .preconditions import UsageError, check_model_path, group_size_error

if TYPE_CHECKING:
    from trl import GRPOConfig

__all__ = ["CHECKPOINT_SUBDIR", "DEFAULTS", "SDPO_DEFAULTS", "check_arguments"]

# Kit defaults for the knobs shared with GRPOConfig (used when neither a flat knob nor `grpo_config` sets
# them). Group size and batch follow the seed's example; weight decay and clipping are the paper's. The
# learning rate is not the seed's 1e-5 (the paper's full fine-tuning rate): with AdamW the first step moves a
# LoRA r16 adapter by ~lr x a width factor of its norm, measured 9.5e-5 (tiny test model) and 4.7e-4 (embedded
# SmolLM2-135M) at 1e-5, 1.9e-3 and 9.4e-3 at 2e-4 (benchmarks/learning/lora_movement.py). 2e-4 clears the no-op
# watchdog's MOVE_MIN (1e-3) on both; 1e-5 fails it on both (docs/configuration.md, "Learning rate").
DEFAULTS: dict[str, Any] = {
    "max_steps": 100,
    "learning_rate": 2e-4,
    "num_generations": 4,
    "max_completion_length": 128,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 2,
    "temperature": 1.0,
    "seed": 3407,
    "logging_steps": 1,
    "weight_decay": 0.01,
    "max_grad_norm": 1.0,
}


# Kit defaults for SDPO's own knobs, used when no `sdpo_config` is passed (an SDPOConfig you pass is taken as
# is: its defaults are the seed's pure SDPO). The per-group hybrid trains with TRL's GRPO loss in prompt groups
# whose rewards differ and with SDPO's distillation in the others (all failed with feedback, or all succeeded);
# distill_anchor puts TRL's KL penalty to the initial policy on the distilled samples only, which keeps the
# distillation from narrowing the student to a few answers. On the learning panel (3-5 seeds, held-out questions
# never trained on, gym numbers scored right or wrong) the two together met the target (at or above GRPO's mean,
# and pure SDPO's where that beat GRPO) on addition, code, basic_arithmetic and count_bits, and missed it on gcd
# (below GRPO, whose seeds spread widest) and lcm (below both; every method's student repeats the question's
# numbers there); the per-group hybrid without the anchor met three and missed count_bits as well (the figures:
# README's panel table and docs/benchmarks.md, "learning-panel", generated from the records).
SDPO_DEFAULTS: dict[str, Any] = {"grpo_weight": 1.0, "hybrid_mode": "per_group", "distill_anchor": 0.1}


def default_hybrid() -> str:
    """train()'s default hybrid, named with the settings that select it (SDPOConfig, train() and the CLI)."""
    weight, mode, anchor = (SDPO_DEFAULTS[k] for k in ("grpo_weight", "hybrid_mode", "distill_anchor"))
    name, trains = HYBRIDS[mode]
    return (
        f"the {name} hybrid with the KL anchor, train()'s default ({trains}, and a KL penalty to the initial "
        f"policy on the distilled samples; SDPOConfig(grpo_weight={weight}, hybrid_mode='{mode}', "
        f"distill_anchor={anchor}), train(..., grpo_weight={weight}, hybrid_mode='{mode}', distill_anchor={anchor}), "
        f"CLI --grpo-weight {weight:g} --hybrid-mode {mode} --distill-anchor {anchor:g})"
    )


CHECKPOINT_SUBDIR = "checkpoints"


# train()'s numeric arguments: (type, smallest valid value, what the bound means or how to fix it). None is
# always accepted (the config object's value or the default). A float bound of 0 is exclusive (> 0).
_NUMBERS: dict[str, tuple[type, float, str]] = {
    "max_steps": (int, 1, "optimizer steps; there is no epoch mode"),
    "learning_rate": (float, 0, "e.g. 2e-4"),
    "num_generations": (int, 2, "a group needs two completions to compare"),
    "max_completion_length": (int, 1, "the completion token budget"),
    "per_device_train_batch_size": (int, 1, "completions per micro-batch"),
    "gradient_accumulation_steps": (int, 1, "micro-batches per optimizer step"),
    "temperature": (float, 0, "sampling needs one, e.g. 1.0; the evaluation is already greedy"),
    "seed": (int, 0, ""),
    "lora_r": (int, 1, "the LoRA rank, e.g. 16"),
    "lora_alpha": (int, 1, "leave it out to use lora_r"),
    "max_seq_length": (int, 1, "prompt + completion tokens"),
    "eval_size": (int, 0, "0 skips evaluation"),
    "eval_batch_size": (int, 1, "prompts per generation batch in evaluation"),
    "eval_steps": (int, 0, "0: score only before and after"),
    "save_steps": (int, 0, "0 or None: no checkpoints"),
    "logging_steps": (int, 1, "log every N steps"),
}


def _number_error(name: str, value: Any) -> str | None:
    """Why `value` is not valid for train()'s numeric argument `name`, or None when it is."""
    kind, low, meaning = _NUMBERS[name]
    exclusive = kind is float and low == 0
    rule = f"{'an integer' if kind is int else 'a number'} {'>' if exclusive else '>='} {low}"
    rule += f" ({meaning})" if meaning else ""
    if isinstance(value, str):
        try:
            kind(value)
            fix = f"; pass {name}={value}, not the string {value!r}"
        except ValueError:
            fix = ""
        return f"`{name}` must be {rule}, got {value!r}{fix}."
    number = isinstance(value, numbers.Integral if kind is int else numbers.Real) and not isinstance(
        value, bool
    )
    if not number or not math.isfinite(value) or value < low or (exclusive and value == low):
        return f"`{name}` must be {rule}, got {value!r}."
    return None


def check_arguments(arguments: dict[str, Any]) -> None:
    """train()'s arguments that can be checked before anything loads: a model folder that exists, numbers in
    range, export_formats a list.

    >>> check_arguments({"lora_r": 0})
    Traceback (most recent call last):
    ...
    sdpo_unsloth.preconditions.UsageError: `lora_r` must be an integer >= 1 (the LoRA rank, e.g. 16), got 0.
    """
    if "model" in arguments:
        check_model_path(arguments["model"])
    for name, value in arguments.items():
        if name in _NUMBERS and value is not None:
            error = _number_error(name, value)
            if error:
                raise UsageError(error)
    formats = arguments.get("export_formats")
    if isinstance(formats, str):
        raise UsageError(
            f"`export_formats` must be a list of formats, got the string {formats!r}; pass "
            f"{[f.strip() for f in formats.split(',')]}."
        )


def _prompts_per_step(args: GRPOConfig) -> int:
    return max(1, args.generation_batch_size // args.num_generations)


def _device_settings(device: str) -> dict[str, Any]:
    """Precision, optimizer and checkpointing that suit the device (fp16 on a T4, fp32 on CPU)."""
    if device == "cuda":
        bf16 = bf16_supported()
        return {"bf16": bf16, "fp16": not bf16, "optim": "adamw_8bit", "gradient_checkpointing": True}
    return {
        "bf16": False,
        "fp16": False,
        "optim": "adamw_torch",
        "gradient_checkpointing": False,
        "use_cpu": device == "cpu",
    }


def _build_sdpo_config(base: SDPOConfig | None, **flat: Any) -> SDPOConfig:
    if base is not None and not isinstance(base, SDPOConfig):
        raise UsageError(f"`sdpo_config` must be an SDPOConfig, got {type(base).__name__}.")
    values = base.to_dict() if base is not None else {}
    # the kit's defaults; a grpo_weight of 0 asked for is the seed's pure SDPO (mode "fixed")
    if base is None:
        values.update(SDPO_DEFAULTS)
        if flat.get("grpo_weight") == 0 and flat.get("hybrid_mode") is None:
            values["hybrid_mode"] = "fixed"
    for name, value in flat.items():
        if value is None:
            continue
        if (name, value) in (
            ("distillation_topk", "full"),
            ("reward_timeout", 0),
        ):  # "full" vocab; 0: no limit
            value = None
        values[name] = value
    config = SDPOConfig(**values)
    if (
        base is None
        and flat.get("distill_anchor") is None
        and (config.grpo_weight == 0 or not config.distils)
    ):
        # the default anchor: not for pure SDPO (the seed's loss) nor a mix that distils nothing
        config = dataclasses.replace(config, distill_anchor=0.0)
    return config


def _build_grpo_config(base: GRPOConfig | None, device: str, checkpoint_dir: Path, **flat: Any) -> GRPOConfig:
    from trl import GRPOConfig

    if base is not None and not isinstance(base, GRPOConfig):
        raise UsageError(f"`grpo_config` must be a trl.GRPOConfig, got {type(base).__name__}.")
    device_settings = _device_settings(device)
    if base is None:
        values: dict[str, Any] = {**DEFAULTS, **device_settings, "report_to": "none", "save_strategy": "no"}
    else:
        values = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.init}
        # derived in __post_init__: recomputed from the (possibly overridden) batch settings
        if values.get("steps_per_generation") == base.gradient_accumulation_steps:
            values["steps_per_generation"] = None
        values["generation_batch_size"] = None
        for name in ("bf16", "fp16"):
            if values.get(name) and not device_settings[name]:
                warnings.warn(
                    f"grpo_config.{name}=True does not suit this device ({device}); using "
                    f"bf16={device_settings['bf16']}, fp16={device_settings['fp16']} instead.",
                    stacklevel=3,
                )
                values.update(bf16=device_settings["bf16"], fp16=device_settings["fp16"])
    for name, value in flat.items():
        if value is not None:
            values[name] = value
    values["output_dir"] = str(checkpoint_dir)
    values["remove_unused_columns"] = False  # rewards read dataset columns (answer, tests, ...)
    mismatch = group_size_error(
        values["per_device_train_batch_size"],
        values.get("steps_per_generation") or values["gradient_accumulation_steps"],
        values["num_generations"],
        processes=int(os.environ.get("WORLD_SIZE", "1")),  # accelerate launch / torchrun
    )
    if mismatch:
        raise UsageError(mismatch)
    try:
        return GRPOConfig(**values)
    except ValueError as exc:
        raise UsageError(f"invalid training settings: {exc}") from None


# config.json entries that set the shapes a LoRA adapter is trained on
_SHAPE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")


def _model_config(name: str) -> dict[str, Any] | None:
    """The config.json of a local model folder or an already downloaded hub model (no network), or None."""
    from .model import _resolve_path

    try:
        path = Path(_resolve_path(name)).expanduser() / "config.json"
    except ValueError:  # a folder that no longer exists
        return None
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name, "config.json")
        except Exception:  # not a hub name
            cached = None
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _check_same_lora(checkpoint: str, model: str | None, lora_r: int | None, lora_alpha: int | None) -> None:
    """The checkpoint's adapter has this run's LoRA shape and base model; else a resume fails in loading with
    hundreds of size mismatches."""
    from .model import DEFAULT_TARGET_MODULES

    try:
        saved = json.loads((Path(checkpoint) / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # not a LoRA checkpoint (a plain Trainer's), or checked by checkpoint_damage
    base = saved.get("base_model_name_or_path")
    differs = []
    if lora_r is not None and saved.get("r") not in (None, lora_r):
        differs.append(f"lora_r={saved['r']} (this run: {lora_r})")
    alpha = lora_alpha or lora_r
    if alpha is not None and saved.get("lora_alpha") not in (None, alpha):
        differs.append(f"lora_alpha={saved['lora_alpha']} (this run: {alpha})")
    targets = saved.get("target_modules")
    if isinstance(targets, list) and set(targets) != set(DEFAULT_TARGET_MODULES):
        differs.append(f"target_modules={sorted(targets)} (this run: {sorted(DEFAULT_TARGET_MODULES)})")
    if model and base and base != model:
        ours, theirs = _model_config(model), _model_config(base)
        if ours and theirs and any(ours.get(k) != theirs.get(k) for k in _SHAPE_KEYS):
            differs.append(f"base model {base} (this run: {model})")
    if differs:
        raise UsageError(
            f"checkpoint {checkpoint} was trained with {', '.join(differs)}; resume with the same settings, or "
            "train this configuration in a new output_dir."
        )


def _damage_error(checkpoint: str, damage: str) -> UsageError:
    """The error for a checkpoint that cannot be resumed from, naming the next older usable one."""
    older = previous_checkpoint(checkpoint)
    fix = (
        f"resume from the previous one with resume={older!r} (and delete {checkpoint})"
        if older
        else "there is no older checkpoint to resume from: delete it, or train from scratch in a new output_dir"
    )
    return UsageError(f"cannot resume from {checkpoint}: {damage}; {fix}.")


def _resume_target(
    resume: bool | str,
    checkpoint_dir: Path,
    *,
    model: str | None = None,
    lora_r: int | None = None,
    lora_alpha: int | None = None,
) -> str | None:
    """The checkpoint a run resumes from, checked before the model loads: complete, readable, and saved with
    this run's LoRA settings and base model."""
    if resume is False or resume is None:
        return None
    if resume is True:
        found = last_complete_checkpoint(checkpoint_dir)
        if found is None:
            warnings.warn(
                f"resume=True but {checkpoint_dir} has no complete checkpoint; starting from scratch.",
                stacklevel=3,
            )
            return None
    else:
        path = Path(resume)
        found = str(path) if (path / "trainer_state.json").is_file() else last_complete_checkpoint(path)
        if found is None:
            raise UsageError(
                f"resume={str(resume)!r} is neither a complete checkpoint (no trainer_state.json) nor a folder "
                "with one; pass resume=True to pick the last complete checkpoint of this run."
            )
    damage = checkpoint_damage(found)
    if damage:
        raise _damage_error(found, damage)
    _check_same_lora(found, model, lora_r, lora_alpha)
    return found
