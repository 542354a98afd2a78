"""Write a merged Llama- or Qwen2-family model as one GGUF file, in Python (no llama.cpp build).

Used by `export(..., format="gguf")`. Tensors are renamed with `gguf`'s own name map, the query/key
projections of the `llama` architecture are reordered for GGUF's rotary layout, 1-D tensors (norms,
biases) stay f32 and matrices are stored in the requested type: f32, f16, bf16 or q8_0 (quantised by
`gguf`'s numpy code; a matrix whose rows are not a multiple of q8_0's 32-value block stays f16). The
byte-level BPE tokenizer goes in as llama.cpp's "gpt2" tokenizer model with its merges, special
tokens and chat template. K-quants (q4_k_m, ...) need llama.cpp's `llama-quantize` and are not made here.

The file is checked by loading it back with transformers' GGUF reader (see `exporter.gguf`).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = ["QUANTIZATIONS", "SUPPORTED_MODEL_TYPES", "GGUFExportError", "write_gguf"]

# model_type -> gguf architecture name
SUPPORTED_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
QUANTIZATIONS = ("f32", "f16", "bf16", "q8_0")
_Q8_BLOCK = 32


class GGUFExportError(RuntimeError):
    """A model or tokenizer this writer cannot convert; the message names the alternative."""


def _gguf():
    try:
        import gguf
    except ImportError:
        raise GGUFExportError("GGUF export needs the `gguf` package: pip install gguf") from None
    return gguf


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise GGUFExportError(
            f"rope type {kind!r} is not written by this GGUF writer; export format='merged_16bit' and convert it "
            "with llama.cpp's convert_hf_to_gguf.py."
        )
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise GGUFExportError("the model config has no rope_theta.")
    return float(theta)


def _interleave_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder rows of a q/k projection from HF's half-split rotary layout to GGUF's pairwise one.

    HF rotates dimension i with i + d/2 inside each head; the `llama` GGUF kernels rotate 2i with 2i+1.
    Row (head h, half j, index i) therefore moves to (head h, index i, half j).
    """
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)
    )


def pre_tokenizer_name(model_type: str, vocab_size: int) -> str:
    """llama.cpp's name for the pre-tokenizer, for the families whose regex it knows; "default" otherwise."""
    if model_type == "qwen2":
        return "qwen2"
    if model_type == "llama" and vocab_size == 49152:  # SmolLM / SmolLM2
        return "smollm"
    if model_type == "llama" and vocab_size in (128256, 128257):  # Llama 3
        return "llama-bpe"
    return "default"


def _tokenizer_tables(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    gguf = _gguf()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GGUFExportError(
            f"{type(tokenizer).__name__} is not a fast (tokenizers) tokenizer; GGUF export needs one."
        )
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("decoder") or {}):
        raise GGUFExportError(
            "only byte-level BPE tokenizers (Qwen2, SmolLM2, Llama 3, ...) are written here; export "
            "format='merged_16bit' and convert with llama.cpp's convert_hf_to_gguf.py."
        )
    tokens: dict[int, str] = {idx: text for text, idx in model["vocab"].items()}
    types = {idx: int(gguf.TokenType.NORMAL) for idx in tokens}
    for idx, added in tokenizer.added_tokens_decoder.items():
        tokens[idx] = added.content
        types[idx] = int(gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED)
    size = max(vocab_size, max(tokens) + 1)
    names = [tokens.get(i, f"[PAD{i}]") for i in range(size)]
    kinds = [types.get(i, int(gguf.TokenType.UNUSED)) for i in range(size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:
        warnings.warn(
            'the tokenizer has no BPE merges: llama.cpp refuses such a vocabulary ("cannot find tokenizer merges"), '
            "transformers' GGUF reader still loads the file.",
            stacklevel=3,
        )
    return names, kinds, merges


def _stored(array: Any, quantization: str) -> tuple[Any, Any]:
    """The array to write and its GGUF type: 1-D tensors f32, matrices as asked."""
    import numpy as np

    gguf = _gguf()
    kind = gguf.GGMLQuantizationType
    if array.ndim < 2 or quantization == "f32":
        return array.astype(np.float32), kind.F32
    if quantization == "f16" or (quantization == "q8_0" and array.shape[-1] % _Q8_BLOCK):
        return array.astype(np.float16), kind.F16
    target = kind.BF16 if quantization == "bf16" else kind.Q8_0
    return gguf.quants.quantize(array.astype(np.float32), target), target


def write_gguf(model: Any, tokenizer: Any, path: Path, quantization: str, name: str) -> dict[str, Any]:
    """Write `model` (a plain transformers causal LM, already merged) and `tokenizer` to `path`.

    Returns what was written: architecture, tensor count, types, pre-tokenizer name.
    """
    gguf = _gguf()
    if quantization not in QUANTIZATIONS:
        raise GGUFExportError(
            f"this GGUF writer makes {', '.join(QUANTIZATIONS)}; {quantization!r} needs llama.cpp's "
            f"llama-quantize (write q8_0 or f16 here, then `llama-quantize in.gguf out.gguf {quantization.upper()}`)."
        )
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise GGUFExportError(
            f"model type {model_type!r} is not written by this GGUF writer (it handles "
            f"{', '.join(sorted(SUPPORTED_MODEL_TYPES))}); export format='merged_16bit' and convert it with "
            "llama.cpp's convert_hf_to_gguf.py."
        )
    arch = SUPPORTED_MODEL_TYPES[model_type]
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layers = config.num_hidden_layers
    tensor_names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[quantization]

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(heads))
    writer.add_head_count_kv(int(kv_heads))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(int(head_dim))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_file_type(int(file_type))

    tokens, token_types, merges = _tokenizer_tables(tokenizer, int(config.vocab_size))
    pre = pre_tokenizer_name(model_type, int(config.vocab_size))
    if pre == "default":
        warnings.warn(
            f"no llama.cpp pre-tokenizer is known for this {model_type} tokenizer ({config.vocab_size} tokens): the GGUF "
            "says 'default', so llama.cpp may split text differently from training. Compare its tokens "
            "(llama-tokenize) on a few prompts before deploying.",
            stacklevel=2,
        )
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    for setter, value in (
        (writer.add_bos_token_id, tokenizer.bos_token_id),
        (writer.add_eos_token_id, tokenizer.eos_token_id),
        (writer.add_pad_token_id, tokenizer.pad_token_id),
        (writer.add_unk_token_id, tokenizer.unk_token_id),
    ):
        if value is not None:
            setter(int(value))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)

    counts: dict[str, int] = {}
    with torch.no_grad():
        for hf_name, tensor in model.state_dict().items():
            if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
                continue
            target = tensor_names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if target is None:
                raise GGUFExportError(f"no GGUF name for tensor {hf_name!r} ({arch}).")
            data = tensor.detach().to(torch.float32).cpu()
            if arch == "llama" and ".self_attn.q_proj." in hf_name:
                data = _interleave_rotary(data, heads)
            elif arch == "llama" and ".self_attn.k_proj." in hf_name:
                data = _interleave_rotary(data, kv_heads)
            array, kind = _stored(data.numpy(), quantization)
            writer.add_tensor(target, array, raw_dtype=kind)
            counts[kind.name] = counts.get(kind.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {
        "architecture": arch,
        "tensors": sum(counts.values()),
        "tensor_types": counts,
        "pre_tokenizer": pre,
        "vocab_size": len(tokens),
        "tied_output": tied,
    }
