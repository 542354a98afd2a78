"""`doctor`: the backend, GPU, dtype and versions in one place, known-bad combinations, a VRAM estimate.

Callable from Python (a notebook) as well as from `sdpo-unsloth doctor`.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from importlib import metadata as importlib_metadata
from typing import Any

from .bootstrap import BACKENDS, bf16_supported

# The training stack, with the versions `tests/gpu` and the GPU benchmark passed with (H200 in fp16,
# docs/benchmarks.md); `package_versions` reports these packages in this order.
TESTED_GPU_STACK = {
    "torch": "2.11.0",
    "transformers": "5.17.0",
    "trl": "1.14.2",
    "peft": "0.21.2",
    "accelerate": "1.15.0",
    "bitsandbytes": "0.50.2",
    "datasets": "4.8.5",
    "unsloth": "2026.10.9",
    "unsloth_zoo": "2026.10.9",
}
_PACKAGES = tuple(TESTED_GPU_STACK)
_GIB = 1024**3


def package_versions(extra: Sequence[str] = ()) -> dict[str, str | None]:
    """Installed versions (None: not installed), read from metadata without importing the packages.

    `extra` names further distributions to report after the training stack.
    """
    found: dict[str, str | None] = {}
    for name in (*_PACKAGES, *extra):
        try:
            found[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            found[name] = None
    return found


def gpu_info() -> dict[str, Any] | None:
    """Name, memory, compute capability and bf16 support of CUDA device 0 and the number of devices, or None
    without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {
        "name": props.name,
        "memory_gib": props.total_memory / _GIB,
        "capability": f"{props.major}.{props.minor}",
        "bf16": bf16_supported(),
        "count": torch.cuda.device_count(),
    }


def _version_tuple(text: str | None) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text or "")[:3])


def known_problems(
    versions: dict[str, str | None], gpu: dict[str, Any] | None, dtype: str, early_modules: Sequence[str]
) -> list[str]:
    """Warnings for combinations known to fail (a pure function, so each rule is testable).

    >>> known_problems({"trl": "1.15.0"}, None, "auto", [])[0][:40]
    "trl 1.15.0's GRPOTrainer fails on CPU (i"
    """
    problems = []
    if versions.get("trl") == "1.15.0" and gpu is None:
        problems.append(
            "trl 1.15.0's GRPOTrainer fails on CPU (its Triton code path); install trl 1.14.2: pip install 'trl==1.14.2'"
        )
    if dtype in ("bf16", "bfloat16") and gpu is not None and not gpu["bf16"]:
        problems.append(
            f"bf16 requested but {gpu['name']} has no bf16 (e.g. a T4): use fp16 (train() picks it when dtype is left "
            "automatic; set bf16=False, fp16=True in a GRPOConfig)"
        )
    if dtype in ("bf16", "bfloat16", "fp16", "float16") and gpu is None:
        problems.append(
            f"{dtype} requested on CPU: CPU training runs in fp32 (train() picks it automatically)"
        )
    if early_modules and versions.get("unsloth"):
        problems.append(
            f"{', '.join(early_modules)} imported before unsloth: unsloth cannot patch them. Put `import sdpo_unsloth` "
            "(or `import unsloth`) first and restart the runtime"
        )
    if versions.get("unsloth"):
        caps = {"trl": (1, 15, 0), "transformers": (5, 17, 0)}
        for name, cap in caps.items():
            if versions.get(name) and _version_tuple(versions[name]) > cap:
                problems.append(
                    f"{name} {versions[name]} is newer than unsloth 2026.10 supports (<= {'.'.join(map(str, cap))}); "
                    f"pip install '{name}<={'.'.join(map(str, cap))}'"
                )
    return problems


def _layer_shapes(config: Any) -> tuple[dict[str, tuple[int, int]], int, int]:
    """Linear layers' (in, out) by name, quantisable parameter count, other parameter count (meta device)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linears, quantised, total = {}, 0, 0
    head = model.get_output_embeddings()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            linears[name] = (module.in_features, module.out_features)
            quantised += module.weight.numel()
    seen = set()
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
    return linears, quantised, total - quantised


def estimate_vram(
    config: Any,
    *,
    per_device_train_batch_size: int = 4,
    gradient_accumulation_steps: int = 2,
    num_generations: int = 4,
    prompt_length: int = 256,
    max_completion_length: int = 128,
    lora_r: int = 16,
    load_in_4bit: bool = True,
    gradient_checkpointing: bool = True,
    teacher: bool = True,
    dtype_bytes: int = 2,
    optimizer_state_bytes: int = 2,
) -> dict[str, float]:
    """A rough peak-VRAM estimate in bytes, by component (an estimate, not a measurement).

    Base: 4-bit linear weights at 0.5 byte (+~6% for nf4 block scales), embeddings/norms/lm_head in 16-bit.
    LoRA: student fp32 weights + grads + optimizer states (8-bit AdamW: 2 bytes), teacher fp32 weights.
    Training: activations of one micro-batch (checkpointed layers keep one hidden state each) plus fp32
    logits of the completion tokens (and their log-softmax). Generation: the KV cache of the generation
    batch. Peak = weights + the larger of the training and generation phases. Excludes the CUDA context
    (~0.3-0.5 GiB) and allocator fragmentation.
    """
    from .model import DEFAULT_TARGET_MODULES

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    linears, quantisable, other = _layer_shapes(config)
    hidden, layers, vocab = text.hidden_size, text.num_hidden_layers, text.vocab_size
    intermediate = getattr(text, "intermediate_size", 4 * hidden)
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    weight_bytes = quantisable * (0.5 * 1.06 if load_in_4bit else dtype_bytes) + other * dtype_bytes
    lora = sum(
        lora_r * (i + o)
        for name, (i, o) in linears.items()
        if name.rsplit(".", 1)[-1] in DEFAULT_TARGET_MODULES
    )
    lora_bytes = lora * (4 + 4 + optimizer_state_bytes) + (lora * 4 if teacher else 0)
    batch, length = per_device_train_batch_size, prompt_length + max_completion_length
    tokens = batch * length
    per_layer_full = tokens * (10 * hidden + 3 * intermediate) * dtype_bytes
    if gradient_checkpointing:
        activations = layers * tokens * hidden * dtype_bytes + per_layer_full
    else:
        activations = layers * per_layer_full
    logits = 2 * batch * max_completion_length * vocab * 4
    generation_batch = per_device_train_batch_size * gradient_accumulation_steps
    kv_cache = 2 * layers * kv_heads * head_dim * generation_batch * length * dtype_bytes
    generation_logits = generation_batch * vocab * 4
    training = activations + logits
    generation = kv_cache + generation_logits
    return {
        "parameters": float(quantisable + other),
        "base_weights": weight_bytes,
        "lora_student_teacher_optimizer": float(lora_bytes),
        "training_activations": float(activations),
        "training_logits": float(logits),
        "generation_kv_cache": float(kv_cache),
        "peak": weight_bytes + lora_bytes + max(training, generation),
    }


def _load_config(model: str) -> Any:
    from transformers import AutoConfig

    path = model
    if model == "embedded":
        from .embedded import embedded_model_path

        path = embedded_model_path()
    try:
        return AutoConfig.from_pretrained(path)
    except OSError as exc:
        raise ValueError(
            f"cannot read the config of {model!r} ({str(exc).splitlines()[0]}); pass a local model folder, "
            "'embedded', or a hub name that is cached or reachable."
        ) from None


def doctor(model: str | None = None, *, dtype: str = "auto", **shape: Any) -> str:
    """The environment report of `sdpo-unsloth doctor`; call it in a notebook to check that process.

    Args:
        model: a model folder, hub name or "embedded": adds a peak-VRAM estimate for it.
        dtype: "auto", "bf16", "fp16" or "fp32".
        **shape: the run's shape for that estimate, any of `estimate_vram`'s keyword arguments
            (per_device_train_batch_size, prompt_length, max_completion_length, lora_r, load_in_4bit, ...);
            its defaults where left out, except `load_in_4bit`: `train()`'s on a GPU (off for "embedded").
    """
    import inspect

    defaults = {
        name: p.default
        for name, p in inspect.signature(estimate_vram).parameters.items()
        if p.kind is p.KEYWORD_ONLY
    }
    unknown = sorted(set(shape) - set(defaults))
    if unknown:
        raise TypeError(f"doctor() got unknown settings {unknown}; it takes {', '.join(defaults)}.")
    if shape.get("load_in_4bit") is None:  # train()'s GPU default for this model
        from .model import default_load_in_4bit

        shape["load_in_4bit"] = default_load_in_4bit(model or "", "cuda")
    shape = {**defaults, **shape}
    from . import __version__
    from .bootstrap import current_backend, imported_too_early

    versions = package_versions()
    gpu = gpu_info()
    lines = [f"sdpo-unsloth {__version__} on Python {sys.version.split()[0]}"]
    lines.append(f"  {'package':13s}{'installed':16s}tested on GPU")
    for name, version in versions.items():
        tested = TESTED_GPU_STACK.get(name, "")
        mark = "" if not tested or (version or "").split("+")[0] == tested else "  (differs)"
        lines.append(f"  {name:13s}{(version or 'not installed'):16s}{tested}{mark}")
    if gpu:
        lines.append(
            f"device         cuda: {gpu['name']} ({gpu['memory_gib']:.1f} GiB, compute {gpu['capability']}, "
            f"bf16 {'yes' if gpu['bf16'] else 'no'})"
        )
    else:
        lines.append("device         cpu (no CUDA GPU)")
    backend = current_backend()
    forced = os.environ.get("SDPO_UNSLOTH_BACKEND", "auto")
    if backend is not None:
        lines.append(f"backend        {backend.name} ({backend.reason})")
    elif forced not in BACKENDS:
        lines.append(
            f"backend        SDPO_UNSLOTH_BACKEND={forced!r} is not a backend ({', '.join(BACKENDS)}): training "
            "would stop at its first step; fix or unset it"
        )
    elif forced != "auto":
        lines.append(f"backend        {forced} (SDPO_UNSLOTH_BACKEND)")
    elif gpu and versions["unsloth"]:
        lines.append("backend        unsloth (CUDA GPU and unsloth installed)")
    else:
        reason = "no CUDA GPU" if not gpu else "unsloth not installed"
        lines.append(f"backend        transformers + peft ({reason})")
    gpus = gpu["count"] if gpu else 0
    lines.append(
        f"processes      several (accelerate launch / torchrun, DDP) on the transformers backend; "
        f"one on unsloth ({gpus} CUDA GPU{'s' if gpus != 1 else ''} here; docs/scaling.md)"
    )
    auto = ("bf16" if gpu["bf16"] else "fp16") if gpu else "fp32"
    chosen = auto if dtype == "auto" else dtype
    lines.append(
        f"dtype          {chosen}"
        + (" (automatic: bf16 where supported, fp16 on a T4, fp32 on CPU)" if dtype == "auto" else "")
    )
    early = imported_too_early()
    lines.append(
        "import order   "
        + (f"{', '.join(early)} imported before unsloth" if early and versions["unsloth"] else "ok")
    )
    problems = known_problems(versions, gpu, dtype, early)
    lines += [f"WARNING: {p}" for p in problems] or ["no known problems"]
    if model:
        shape["dtype_bytes"] = 4 if chosen in ("fp32", "float32") else 2
        estimate = estimate_vram(_load_config(model), **shape)
        base = "4-bit" if shape["load_in_4bit"] else f"{8 * shape['dtype_bytes']}-bit"
        lines.append(
            f"peak VRAM estimate for {model} ({estimate['parameters'] / 1e6:.0f}M parameters, "
            f"{base} base, batch {shape['per_device_train_batch_size']}, "
            f"{shape['prompt_length']}+{shape['max_completion_length']} tokens): ~{estimate['peak'] / _GIB:.2f} GiB"
        )
        for key in (
            "base_weights",
            "lora_student_teacher_optimizer",
            "training_activations",
            "training_logits",
            "generation_kv_cache",
        ):
            lines.append(f"  {key:32s}{estimate[key] / _GIB:7.3f} GiB")
        lines.append(
            "  (an estimate, +-30%: excludes the CUDA context and fragmentation; unsloth's offloaded "
            "checkpointing and chunked logits usually need less)"
        )
        if gpu and estimate["peak"] > 0.9 * gpu["memory_gib"] * _GIB:
            lines.append(
                f"WARNING: the estimate is close to or above {gpu['name']}'s memory; lower the batch or lengths."
            )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ parser
