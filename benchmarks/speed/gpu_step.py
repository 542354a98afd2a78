"""GPU benchmark: peak VRAM and step time of GRPO vs SDPO on Qwen2.5-sized models with random weights.

Each stage (backend x model size) runs in its own subprocess, since the backend is chosen once per
process (unsloth must be imported first). Inside a stage, GRPO (`SDPOConfig(enabled=False)`) and then
SDPO (default `SDPOConfig`, EMA teacher) each load the model afresh; peak memory is reset between runs.
Every run's result is appended to `<out>/gpu_step.jsonl` as soon as it is measured, and all of them are
gathered in `<out>/gpu_step.json` at the end. One failing run or stage prints its traceback and the
benchmark goes on; a wall-clock budget skips what no longer fits.

    python benchmarks/speed/gpu_step.py --out $OUT                      # the GPU benchmark (see gpu_run.sh)
    python benchmarks/speed/gpu_step.py --tiny --out /tmp/bench         # CPU smoke test: 2 layers, hidden 64

No hub access: the model is built from Qwen2.5's config with random weights and saved (fp16) with a
word-level tokenizer that decodes every id, then loaded back through `sdpo_unsloth.load_model`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

for _key, _value in (
    ("OMP_NUM_THREADS", "1"),
    ("HF_HUB_OFFLINE", "1"),
    ("TRANSFORMERS_OFFLINE", "1"),
    ("HF_DATASETS_OFFLINE", "1"),
    ("TOKENIZERS_PARALLELISM", "false"),
    ("WANDB_DISABLED", "true"),
):
    os.environ.setdefault(_key, _value)

# Qwen2.5-0.5B-Instruct / Qwen2.5-1.5B-Instruct configs (random weights).
MODELS: dict[str, dict[str, Any]] = {
    "0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
    ),
    "1.5b": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
}
QWEN_VOCAB = 151936
TINY_VOCAB = 512
# Qwen2.5's special-token ids: <|endoftext|> (pad), <|im_start|>, <|im_end|> (eos).
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 151643, 151644, 151645
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Rough wall-clock seconds per run of 2 + 8 steps (load, compile, steps) on an H200, used to skip what no longer
# fits the budget: measured 77-126 s at 0.5B (GRPO fastest, SDPO slowest: one more compile) and 118-152 s at
# 1.5B. A stage also imports the backend and builds/saves the model first (unsloth: 25-45 s).
RUN_ESTIMATE_S = {"0.5b": 110.0, "1.5b": 135.0, "tiny": 20.0}
STAGE_OVERHEAD_S = {"transformers": 25.0, "unsloth": 45.0}


def log(msg: str) -> None:
    print(f"[gpu_step {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------- model


def make_tokenizer(vocab_size: int):
    """Byte-level tokenizer over `vocab_size` ids with Qwen's pipeline and no merges: one token per byte.

    Built as a `Qwen2Tokenizer` (what transformers 5 reloads for `model_type=qwen2` anyway), so save/reload
    keeps the ids. Specials sit at Qwen's ids; the other ids are fillers that decode to `<x123>`.
    """
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    if vocab_size == QWEN_VOCAB:
        specials = {ENDOFTEXT_ID: "<|endoftext|>", IM_START_ID: "<|im_start|>", IM_END_ID: "<|im_end|>"}
    else:  # tiny: the last three ids
        specials = {
            vocab_size - 3: "<|endoftext|>",
            vocab_size - 2: "<|im_start|>",
            vocab_size - 1: "<|im_end|>",
        }
    pool = iter(sorted(pre_tokenizers.ByteLevel.alphabet()))
    vocab: dict[str, int] = {}
    for i in range(vocab_size):
        vocab[specials.get(i) or next(pool, None) or f"<x{i}>"] = i
    assert len(vocab) == vocab_size, "duplicate tokens in the synthetic vocabulary"
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def model_config(size: str):
    from transformers import Qwen2Config

    vocab = TINY_VOCAB if size == "tiny" else QWEN_VOCAB
    return Qwen2Config(
        vocab_size=vocab,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=True,
        hidden_act="silu",
        use_sliding_window=False,
        bos_token_id=vocab - 3 if size == "tiny" else ENDOFTEXT_ID,
        eos_token_id=vocab - 1 if size == "tiny" else IM_END_ID,
        pad_token_id=vocab - 3 if size == "tiny" else ENDOFTEXT_ID,
        **MODELS[size],
    )


def ensure_model_dir(size: str, root: str) -> tuple[str, dict[str, Any]]:
    """Build the random-weight model once (on the GPU when there is one) and save it in fp16 with its tokenizer."""
    import torch

    path = os.path.join(root, f"qwen2.5-{size}-random")
    marker = os.path.join(path, "bench_model.json")
    if os.path.exists(marker):
        with open(marker) as f:
            return path, json.load(f)
    t0 = time.perf_counter()
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = model_config(size)
    tokenizer = make_tokenizer(config.vocab_size)
    assert len(tokenizer) == config.vocab_size, (len(tokenizer), config.vocab_size)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.float16 if device == "cuda" else torch.float32
        )
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    info = {
        "base_params": int(model.num_parameters()),
        "vocab_size": config.vocab_size,
        "config": {
            k: getattr(config, k)
            for k in (
                *MODELS[size],
                "vocab_size",
                "tie_word_embeddings",
                "rms_norm_eps",
                "max_position_embeddings",
            )
        },
        "rope_parameters": getattr(config, "rope_parameters", None),
    }
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    # The reloaded tokenizer must keep the ids (transformers 5 may swap in another class for qwen2).
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(path)
    sample = "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n"
    ids_a, ids_b = tokenizer(sample)["input_ids"], reloaded(sample)["input_ids"]
    probe = [1, 2, 500, config.vocab_size - 1, config.eos_token_id]
    info["tokenizer_roundtrip_ok"] = bool(
        ids_a == ids_b
        and len(reloaded) == config.vocab_size
        and reloaded.decode(probe) == tokenizer.decode(probe)
    )
    info["tokenizer_class_reloaded"] = type(reloaded).__name__
    info["build_s"] = round(time.perf_counter() - t0, 1)
    if not info["tokenizer_roundtrip_ok"]:
        raise RuntimeError(
            f"tokenizer save/reload changed ids: {ids_a[:20]} vs {ids_b[:20]} ({type(reloaded)})"
        )
    with open(marker, "w") as f:
        json.dump(info, f)
    log(f"built {size} model at {path}: {info['base_params'] / 1e6:.1f}M params in {info['build_s']}s")
    return path, info


# ---------------------------------------------------------------------------------------------- run


class FeedbackReward:
    """Scores every completion 0.0 and gives feedback, so every SDPO sample has a teacher (the worst case)."""

    __name__ = "always_wrong"

    def __init__(self) -> None:
        self.last_feedback: list[str] = []

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        self.last_feedback = [
            f"Your answer to question {i} is wrong: the result must be a single integer."
            for i in range(len(completions))
        ]
        return [0.0] * len(completions)


def make_dataset(n: int = 64):
    from datasets import Dataset

    rows = [
        {"prompt": [{"role": "user", "content": f"What is {3 * i + 7} + {5 * i + 11}? Answer briefly."}]}
        for i in range(n)
    ]
    return Dataset.from_list(rows)


def versions() -> dict[str, str | None]:
    from sdpo_unsloth.doctor import package_versions

    out = package_versions(extra=("triton", "sdpo-unsloth"))
    try:
        import torch

        out["torch.version.cuda"] = torch.version.cuda
    except Exception:
        pass
    return out


def listen_to_recompiles(record: Callable[[str, list[str]], None]) -> None:
    """Call `record(where, guards)` at each dynamo recompile: its first line ("Recompiling function X in
    file:line") and the guard that failed against each cached graph (the "- i/j: guard" lines)."""
    import logging

    import torch
    import torch._dynamo  # registers the recompiles logger: set up before it, it would keep torch's handler

    class Handler(logging.Handler):
        def emit(self, entry):
            lines = [line.strip() for line in entry.getMessage().splitlines() if line.strip()]
            if lines:
                record(lines[0], [line[2:] for line in lines if re.match(r"- \d+/\d+: ", line)])

    torch._logging.set_logs(recompiles=True)
    log = logging.getLogger("torch._dynamo.guards.__recompiles")
    log.handlers[:] = [Handler()]
    log.propagate = False


def make_timing_callback(cuda: bool):
    import torch
    from torch._dynamo.utils import counters
    from transformers import TrainerCallback

    class Timing(TrainerCallback):
        """Wall time between consecutive optimizer steps (generation + loss + backward + optimizer), and the
        torch.compile work done in each step: new dynamo graphs and the guards whose failure caused them,
        so that a slow step can be told apart as a (re)compile."""

        def __init__(self) -> None:
            self.step_times: list[float] = []
            self.logs: list[dict[str, Any]] = []
            self.new_graphs: list[int] = []
            self.recompile_reasons: list[list[str]] = []
            self._reasons: list[str] = []
            self._graphs = 0
            self._last = None

        def _now(self) -> float:
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            # here, after the backend's own logging set-up
            listen_to_recompiles(
                lambda where, guards: self._reasons.append(" | ".join([where, *guards])[:1000])
            )
            self._graphs = counters["stats"]["unique_graphs"]
            self._last = self._now()

        def on_step_end(self, args, state, control, **kwargs):
            now = self._now()
            self.step_times.append(now - self._last)
            self._last = now
            graphs = counters["stats"]["unique_graphs"]
            self.new_graphs.append(graphs - self._graphs)
            self._graphs = graphs
            self.recompile_reasons.append(self._reasons)
            self._reasons = []
            log(
                f"step {state.global_step}: {self.step_times[-1]:.2f}s, {self.new_graphs[-1]} new dynamo graphs, "
                f"{len(self.recompile_reasons[-1])} recompiles"
                + "".join(f"\n    {r}" for r in self.recompile_reasons[-1][:6])
            )

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                self.logs.append(
                    {
                        "step": state.global_step,
                        **{k: v for k, v in logs.items() if isinstance(v, int | float)},
                    }
                )

    return Timing()


def run_one(
    kind: str,
    backend: str,
    size: str,
    model_dir: str,
    info: dict[str, Any],
    args: argparse.Namespace,
    deadline: float,
) -> dict[str, Any]:
    import torch
    from trl import GRPOConfig

    from sdpo_unsloth import SDPOConfig, SDPOTrainer, load_model
    from sdpo_unsloth.adapters import adapter_parameter_count

    cuda = torch.cuda.is_available()
    sdpo_cfg = SDPOConfig() if kind == "sdpo" else SDPOConfig(enabled=False)
    result: dict[str, Any] = {
        "backend": backend,
        "model": size,
        "run": kind,
        "status": "started",
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model, tok = load_model(
        model_dir,
        load_in_4bit=args.load_in_4bit,
        dtype="fp16" if cuda else "fp32",
        lora_r=16,
        max_seq_length=1024,
        teacher_adapter=sdpo_cfg.teacher_adapter_name if kind == "sdpo" else None,
        gradient_checkpointing=cuda,
        backend=backend,
    )
    result["load_s"] = round(time.perf_counter() - t0, 2)
    if cuda:
        result["mem_after_load_gib"] = round(torch.cuda.memory_allocated() / 2**30, 3)
        result["peak_during_load_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    result["student_adapter_params"] = adapter_parameter_count(model, "default")
    if kind == "sdpo":
        result["teacher_adapter_params"] = adapter_parameter_count(model, sdpo_cfg.teacher_adapter_name)
    result["base_params"] = info["base_params"]
    if kind == "sdpo":
        result["teacher_over_base"] = result["teacher_adapter_params"] / info["base_params"]

    steps = args.warmup + args.steps
    config = GRPOConfig(
        output_dir=os.path.join(tempfile.gettempdir(), f"gpu_step_{backend}_{size}_{kind}"),
        num_generations=4,
        max_completion_length=args.max_completion_length,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=5e-6,
        max_steps=steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        fp16=cuda,
        gradient_checkpointing=cuda,
        generation_kwargs={"min_new_tokens": args.max_completion_length},  # random weights: no early EOS
        use_cpu=not cuda,
        seed=0,
        disable_tqdm=True,
    )
    timing = make_timing_callback(cuda)
    trainer = SDPOTrainer(
        model=model,
        args=config,
        sdpo_config=sdpo_cfg,
        processing_class=tok,
        reward_funcs=[FeedbackReward()],
        train_dataset=make_dataset(),
        callbacks=[timing],
    )
    result["trainer_class_mro"] = [c.__name__ for c in type(trainer).__mro__[:4]]
    status = "ok"
    try:
        trainer.train()
    except TimeoutError:  # SIGTERM from the budget: keep the steps measured so far
        status = "partial (budget)"
    measured = timing.step_times[args.warmup :]
    lengths = [
        entry["completions/mean_length"] for entry in timing.logs if "completions/mean_length" in entry
    ]
    gen_tokens_per_step = (
        4 * 2 * (statistics.mean(lengths[args.warmup :]) if lengths[args.warmup :] else float("nan"))
    )
    result.update(
        status=status if measured else "no measured step",
        steps_done=len(timing.step_times),
        step_times_s=[round(t, 4) for t in timing.step_times],
        new_dynamo_graphs=timing.new_graphs,
        recompile_reasons=timing.recompile_reasons,
        median_step_s=round(statistics.median(measured), 4) if measured else None,
        completion_mean_length=lengths,
        completion_tokens_per_s=round(gen_tokens_per_step / statistics.median(measured), 1)
        if measured
        else None,
        peak_vram_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,  # since train()
        peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 3) if cuda else None,
        logs=timing.logs,
    )
    distill = [entry["sdpo/distill_loss"] for entry in timing.logs if "sdpo/distill_loss" in entry]
    result["distill_loss"] = distill
    if kind == "sdpo" and measured and not distill:  # a step time that did not include the SDPO loss
        result["status"] = "invalid: the SDPO loss never ran (no sdpo/distill_loss logged)"
    last = next((entry for entry in reversed(timing.logs) if "completions/mean_length" in entry), {})
    result["last_log"] = {k: v for k, v in last.items() if k.startswith(("sdpo/", "loss", "completions/"))}
    del trainer, model
    return result


def child(args: argparse.Namespace) -> int:
    """One stage: one backend, one model size, the requested runs in order."""
    deadline = args.deadline
    stop = {"flag": False}

    def on_term(signum, frame):  # budget exhausted: finish the current run as partial
        stop["flag"] = True
        raise TimeoutError("gpu_step budget exhausted")

    signal.signal(signal.SIGTERM, on_term)
    from sdpo_unsloth import bootstrap

    chosen = bootstrap(args.backend)  # before trl/transformers/peft
    log(f"stage {args.backend}/{args.model}: backend={chosen}")
    import torch

    if args.backend == "unsloth" and chosen.name != "unsloth":
        raise RuntimeError(f"asked for unsloth, got {chosen}")
    model_dir, info = ensure_model_dir(args.model, args.model_root)
    for kind in args.runs.split(","):
        remaining = deadline - time.time()
        if remaining < RUN_ESTIMATE_S[args.model] * 0.6:
            record = {
                "backend": args.backend,
                "model": args.model,
                "run": kind,
                "status": "skipped (budget)",
                "remaining_s": round(remaining, 1),
            }
        else:
            log(f"run {args.backend}/{args.model}/{kind} (remaining {remaining:.0f}s)")
            t0 = time.perf_counter()
            try:
                record = run_one(kind, args.backend, args.model, model_dir, info, args, deadline)
            except BaseException as exc:
                traceback.print_exc()
                record = {
                    "backend": args.backend,
                    "model": args.model,
                    "run": kind,
                    "status": f"error: {type(exc).__name__}: {exc}"[:2000],
                    "traceback": traceback.format_exc()[-6000:],
                }
                if isinstance(exc, KeyboardInterrupt):
                    raise
            record["wall_s"] = round(time.perf_counter() - t0, 1)
        record["versions"] = versions()
        record["backend_reason"] = chosen.reason
        record["model_info"] = info
        with open(os.path.join(args.out, "gpu_step.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        short = {
            k: record.get(k)
            for k in (
                "backend",
                "model",
                "run",
                "status",
                "median_step_s",
                "peak_vram_gib",
                "completion_tokens_per_s",
                "completion_mean_length",
                "load_s",
                "distill_loss",
                "teacher_adapter_params",
                "base_params",
                "wall_s",
            )
        }
        print("RESULT " + json.dumps(short), flush=True)
        if stop["flag"]:
            break
        try:
            import gc

            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:
            pass
    return 0


# ---------------------------------------------------------------------------------------------- main


def run_stage(stage: str, args: argparse.Namespace, start: float) -> None:
    backend, size = stage.split(":")
    remaining = args.budget - (time.time() - start)
    need = STAGE_OVERHEAD_S[backend] + RUN_ESTIMATE_S[size]  # at least the GRPO run
    if remaining < need:
        log(f"skip stage {stage}: {remaining:.0f}s left of the budget, needs ~{need:.0f}s")
        with open(os.path.join(args.out, "gpu_step.jsonl"), "a") as f:
            f.write(
                json.dumps(
                    {
                        "backend": backend,
                        "model": size,
                        "run": "*",
                        "status": "skipped (budget)",
                        "remaining_s": round(remaining, 1),
                    }
                )
                + "\n"
            )
        return
    deadline = start + args.budget
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        "--backend",
        backend,
        "--model",
        size,
        "--runs",
        args.runs,
        "--out",
        args.out,
        "--model-root",
        args.model_root,
        "--deadline",
        str(deadline),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--max-completion-length",
        str(args.max_completion_length),
    ]
    if not args.load_in_4bit:
        cmd.append("--no-4bit")
    log(f"stage {stage}: {' '.join(cmd[2:])}")
    env = dict(os.environ)
    if backend == "unsloth" and args.unsloth_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (args.unsloth_path, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.Popen(cmd, start_new_session=True, env=env)
    try:
        rc = proc.wait(timeout=max(5.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        log(f"stage {stage}: budget reached, SIGTERM (keeps steps measured so far)")
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=args.grace)
        except subprocess.TimeoutExpired:
            log(f"stage {stage}: still running after {args.grace}s, SIGKILL")
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
    log(f"stage {stage}: exit code {rc}, {time.time() - start:.0f}s elapsed in total")
    if rc != 0:
        with open(os.path.join(args.out, "gpu_step.jsonl"), "a") as f:
            f.write(
                json.dumps({"backend": backend, "model": size, "run": "*", "status": f"stage exit code {rc}"})
                + "\n"
            )


def summarize(args: argparse.Namespace, start: float) -> None:
    path = os.path.join(args.out, "gpu_step.jsonl")
    records = []
    if os.path.exists(path):
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(args.out, "gpu_step.json"), "w") as f:
        json.dump(
            {"total_s": round(time.time() - start, 1), "args": vars(args), "results": records}, f, indent=1
        )
    print(
        "\n| backend | model | run | status | median step s | peak VRAM GiB | compl. tok/s | mean len | "
        "teacher params / base | mean distill loss |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in records:
        lengths = r.get("completion_mean_length") or []
        mean_len = round(statistics.mean(lengths), 1) if lengths else None
        losses = r.get("distill_loss") or []
        distill = f"{statistics.mean(losses):.3g}" if losses else ""
        ratio = (
            f"{r['teacher_adapter_params'] / 1e6:.2f}M / {r['base_params'] / 1e6:.0f}M"
            if r.get("teacher_adapter_params")
            else ""
        )
        print(
            f"| {r.get('backend')} | {r.get('model')} | {r.get('run')} | {str(r.get('status'))[:60]} | "
            f"{r.get('median_step_s')} | {r.get('peak_vram_gib')} | {r.get('completion_tokens_per_s')} | "
            f"{mean_len} | {ratio} | {distill} |"
        )
    print(f"\ntotal {time.time() - start:.0f}s; results in {args.out}/gpu_step.json", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--stages",
        default=None,
        help="comma-separated backend:size, run in this order (default: transformers:0.5b,unsloth:0.5b,"
        "transformers:1.5b,unsloth:1.5b; --tiny: transformers:tiny)",
    )
    parser.add_argument("--runs", default="grpo,sdpo", help="runs per stage, in order")
    parser.add_argument("--out", default=os.environ.get("OUT") or "bench_out")
    parser.add_argument(
        "--budget", type=float, default=450.0, help="wall-clock seconds for all stages together"
    )
    parser.add_argument(
        "--grace", type=float, default=20.0, help="seconds between SIGTERM and SIGKILL at the budget"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="measured optimizer steps per run (8; tiny: 2)"
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="warm-up optimizer steps, not measured (2; tiny: 1)"
    )
    parser.add_argument(
        "--unsloth-path",
        default=os.environ.get("GPU_STEP_UNSLOTH_PATH", ""),
        help="folder prepended to PYTHONPATH for unsloth stages only (unsloth and its deps), so the "
        "transformers stages never import them",
    )
    parser.add_argument("--max-completion-length", type=int, default=None, help="128 (tiny: 16)")
    parser.add_argument("--no-4bit", dest="load_in_4bit", action="store_false")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="CPU smoke test: transformers:tiny, 1 warm-up + 2 measured steps, 16-token completions",
    )
    parser.add_argument("--model-root", default=os.path.join(tempfile.gettempdir(), "gpu_step_models"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.child:
        rc = child(args)
        sys.stdout.flush()
        sys.stderr.flush()
        # Results are written: skip the interpreter's teardown (compile workers, CUDA context), which can
        # outlast the budget and turn a finished stage into "exit code -15".
        os._exit(rc)
    if args.tiny:
        args.stages = args.stages or "transformers:tiny"
        args.steps = 2 if args.steps is None else args.steps
        args.warmup = 1 if args.warmup is None else args.warmup
        args.max_completion_length = args.max_completion_length or 16
    args.stages = args.stages or "transformers:0.5b,unsloth:0.5b,transformers:1.5b,unsloth:1.5b"
    args.max_completion_length = args.max_completion_length or 128
    args.steps = 8 if args.steps is None else args.steps
    args.warmup = 2 if args.warmup is None else args.warmup
    start = time.time()
    log(f"stages {args.stages}; budget {args.budget:.0f}s; out {args.out}")
    log("versions " + json.dumps(versions()))
    for stage in [s.strip() for s in args.stages.split(",") if s.strip()]:
        try:
            run_stage(stage, args, start)
        except Exception:
            traceback.print_exc()
        summarize(args, start)  # rewrite gpu_step.json after every stage
    return 0


if __name__ == "__main__":
    sys.exit(main())
