"""Do the GGUF files from `export(format="gguf")` run in llama.cpp as the trained model does in transformers?

    pip install llama-cpp-python      # builds llama.cpp (~10 min on 2 cores)
    OMP_NUM_THREADS=1 python benchmarks/export/gguf_llamacpp.py [--write]

For SmolLM2-135M-Instruct (the embedded model, `llama` architecture, real BPE tokenizer) and a tiny
random `qwen2` model (q/k/v biases, tied output), each with a random LoRA as after training: export GGUF
in f32, f16 and q8_0, load each file with llama.cpp (through llama-cpp-python), and compare
  - token ids: llama.cpp's tokenizer against the training tokenizer on sample texts (the tiny model gets
    a small BPE tokenizer trained here with Qwen2's pre-tokenizer split),
  - next-token logits at every position: max |diff| and top-1 agreement against the merged transformers
    model in fp32.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from datetime import date
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SDPO_UNSLOTH_BACKEND", "transformers")

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared `common` module

TEXTS = (
    "The capital of France is",
    "12+7=19. 34+8=",
    "def add(a, b):\n    return a + b\n",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
)


# Qwen2's pre-tokenizer split (contractions, letters, single digits, punctuation runs, newlines, spaces).
QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def bpe_tokenizer():
    """A small byte-level BPE tokenizer with Qwen2's pre-tokenizer, trained here on a few sentences."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(list(TEXTS) * 20, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )


def randomise_student(model) -> None:
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for name, param in model.named_parameters():
            if "lora_B.default." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)


def compare(model, tokenizer, folder: Path, token_ids: list[list[int]], check_tokenizer: bool) -> dict:
    """One llama.cpp load per file: its tokenizer on TEXTS, then its logits on each sequence."""
    from llama_cpp import Llama

    file = next(folder.glob("*.gguf"))
    row: dict = {"file_mib": file.stat().st_size / 2**20}
    llm = Llama(model_path=str(file), n_ctx=512, logits_all=True, verbose=False, n_threads=1, seed=0)
    if check_tokenizer:
        same = [
            llm.tokenize(t.encode(), add_bos=False, special=True)
            == tokenizer(t, add_special_tokens=False)["input_ids"]
            for t in TEXTS
        ]
        row["tokenizer_ids_equal"] = f"{sum(same)}/{len(same)}"
    diffs, agree, total = [], 0, 0
    model.eval()
    for ids in token_ids:
        with torch.no_grad():
            reference = model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
        llm.reset()  # a fresh context for each sequence
        llm.eval(ids)
        ours = np.array(llm.scores[: len(ids)], dtype=np.float32)
        vocab = reference.shape[-1]
        diffs.append(float(np.abs(ours[:, :vocab] - reference).max()))
        agree += int((ours[:, :vocab].argmax(-1) == reference.argmax(-1)).sum())
        total += len(ids)
    llm.close()
    row["max_abs_logit_diff"] = max(diffs)
    row["top1_agreement"] = agree / total
    row["positions"] = total
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--write", action="store_true", help="write the section of docs/benchmarks.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from conftest import make_tiny_model
    from llama_cpp import __version__ as llama_cpp_version

    from sdpo_unsloth import export, load_model

    work = Path(tempfile.mkdtemp(prefix="gguf_llamacpp-"))
    rows = []

    smol, smol_tok = load_model("embedded", load_in_4bit=False, lora_r=8, backend="transformers")
    randomise_student(smol)
    smol_ids = [smol_tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    tiny_tok = bpe_tokenizer()
    tiny_dir = work / "tiny-qwen2"
    make_tiny_model(len(tiny_tok), hidden=64).save_pretrained(tiny_dir)
    tiny_tok.save_pretrained(tiny_dir)
    tiny, _ = load_model(str(tiny_dir), load_in_4bit=False, lora_r=8, backend="transformers")
    randomise_student(tiny)
    generator = torch.Generator().manual_seed(1)
    tiny_ids = [tiny_tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    tiny_ids += [torch.randint(3, len(tiny_tok), (48,), generator=generator).tolist() for _ in range(2)]

    for label, model, tokenizer, ids, tokenizer_check in (
        ("SmolLM2-135M (llama)", smol, smol_tok, smol_ids, True),
        ("tiny random qwen2", tiny, tiny_tok, tiny_ids, True),
    ):
        for method in ("f32", "f16", "q8_0"):
            folder = work / f"{label.split()[0]}-{method}"
            export(model, folder, format="gguf", gguf_quantization=method, tokenizer=tokenizer)
            row = compare(model, tokenizer, folder, ids, tokenizer_check)
            rows.append((label, method, row))
            print(label, method, row, flush=True)

    if args.write:
        from common import write_section

        lines = [
            f"## GGUF export in llama.cpp (measured {date.today()})",
            "",
            f'Files from `export(format="gguf")` loaded by llama.cpp (llama-cpp-python {llama_cpp_version}, CPU),',
            "compared with the trained adapter model in transformers (fp32) at every position of the inputs.",
            "Each model carries a random LoRA (B ~ N(0, 0.02)), as after training.",
            "",
            "| model | type | file MiB | positions | max abs logit diff | top-1 agreement | llama.cpp token ids |",
            "|---|---|---|---|---|---|---|",
            *(
                f"| {label} | {method} | {row['file_mib']:.1f} | {row['positions']} | "
                f"{row['max_abs_logit_diff']:.3g} | {row['top1_agreement']:.1%} | "
                f"{row['tokenizer_ids_equal']} |"
                for label, method, row in rows
            ),
            "",
            "Reproduce: `pip install llama-cpp-python && OMP_NUM_THREADS=1 python benchmarks/export/gguf_llamacpp.py --write`",
        ]
        write_section("gguf-llamacpp", "\n".join(lines))


if __name__ == "__main__":
    main()
