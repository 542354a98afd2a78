"""Peak memory and time of the SDPO distillation loss, forward + backward: chunked vs naive full logits.

Shape (Qwen2.5-0.5B): V = 151,936, H = 896, 8 sequences x 256 tokens (N = 2048), K = 100, tail on,
alpha = 0.5, fp32 hidden states and lm_head.

- naive:   ``distill_from_logits`` on full [N, V] logits from ``student_hidden @ W.T`` (the teacher's
           computed under no_grad).
- chunked: ``chunked_distill`` on the hidden states, ``--chunk-sizes`` rows of logits at a time.

Each variant runs in a fresh subprocess (``OMP_NUM_THREADS=1``). On CPU the peak is the growth of peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) over its value right after the inputs were allocated and a
small warm-up ran; on CUDA it is ``torch.cuda.max_memory_allocated()`` minus the memory allocated by then.
The first forward + backward sets the peak; time is the median over ``--repeats`` runs.

    OMP_NUM_THREADS=1 python benchmarks/memory/loss_memory.py --write-docs docs/benchmarks.md
    python benchmarks/memory/loss_memory.py --device cuda --json /tmp/cuda.json   # then:
    python benchmarks/memory/loss_memory.py --from-json /tmp/cuda.json --write-docs docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from sdpo_unsloth.config import SDPOConfig

BEGIN, END = "<!-- loss-memory:begin -->", "<!-- loss-memory:end -->"
COMMAND = "OMP_NUM_THREADS=1 python benchmarks/memory/loss_memory.py --write-docs docs/benchmarks.md"


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--sequences", type=int, default=8)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--topk", type=int, default=100)
    p.add_argument("--alpha", type=float, default=0.5)
    default_chunk = SDPOConfig().logit_chunk_size
    p.add_argument("--chunk-sizes", type=int, nargs="+", default=sorted({default_chunk, 1024}, reverse=True))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", type=Path, help="also save the results here")
    p.add_argument("--from-json", type=Path, help="render saved results instead of running")
    p.add_argument("--write-docs", type=Path, help="replace this device's table in the loss-memory section")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # "naive" or "chunked:<size>", run in a subprocess
    return p.parse_args()


def _peak_bytes_cpu() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _worker(args: argparse.Namespace) -> dict:
    import torch

    from sdpo_unsloth.loss import chunked_distill, distill_from_logits

    torch.manual_seed(0)
    dev = torch.device(args.device)
    n = args.sequences * args.length

    def make_inputs(n_tokens: int, vocab: int) -> tuple:
        # in-place initialisation: no input-sized temporaries that would raise the baseline peak
        w = torch.empty(vocab, args.hidden, device=dev).normal_(std=args.hidden**-0.5)  # [V, H]
        hs = torch.empty(n_tokens, args.hidden, device=dev).normal_(std=2.0)  # [N, H]
        ht = torch.empty(n_tokens, args.hidden, device=dev).normal_(std=0.5).add_(hs)  # [N, H]
        y = torch.randint(0, vocab, (n_tokens,), device=dev)  # [N]
        return w, hs, ht, y

    kwargs = {"alpha": args.alpha, "topk": args.topk, "add_tail": True, "temperature": 1.0}
    if args.worker == "naive":

        def step(w, hs, ht, y):
            h = hs.detach().requires_grad_()
            with torch.no_grad():
                teacher_logits = ht @ w.T  # [N, V]
            terms = distill_from_logits(h @ w.T, teacher_logits, y, **kwargs)
            (terms.divergence.sum() + terms.student_logp.sum()).backward()
            return terms.divergence.detach(), h.grad
    else:
        chunk = int(args.worker.split(":")[1])

        def step(w, hs, ht, y):
            h = hs.detach().requires_grad_()
            terms = chunked_distill(h, ht, w, y, chunk_size=chunk, **kwargs)
            (terms.divergence.sum() + terms.student_logp.sum()).backward()
            return terms.divergence.detach(), h.grad

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    step(*make_inputs(8, 512))  # warm-up: kernels and allocator set-up are not part of the peak
    inputs = make_inputs(n, args.vocab)
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _peak_bytes_cpu()
    times = []
    for i in range(args.repeats):
        start = time.perf_counter()
        div, grad = step(*inputs)
        sync()
        times.append(time.perf_counter() - start)
        if i == 0:
            peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda" else _peak_bytes_cpu()) - base
            checksum = [float(div.double().sum()), float(grad.double().norm())]
        del div, grad
    return {
        "variant": args.worker,
        "peak_bytes": peak,
        "seconds": statistics.median(times),
        "checksum": checksum,
    }


def _machine(device: str) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
        cpu = model
    except (OSError, StopIteration):
        pass
    return f"{cpu}, 1 thread (OMP_NUM_THREADS=1), torch {torch.__version__}"


def _run(args: argparse.Namespace) -> dict:
    rows = []
    passthrough = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("device", "vocab", "hidden")]
    passthrough += [f"--{k}={getattr(args, k)}" for k in ("sequences", "length", "topk", "alpha", "repeats")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    for variant in ["naive", *(f"chunked:{c}" for c in args.chunk_sizes)]:
        cmd = [sys.executable, __file__, f"--worker={variant}", *passthrough]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise SystemExit(f"{variant} failed ({out.returncode}):\n{out.stderr[-4000:]}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{variant:>14}: peak +{row['peak_bytes'] / 2**20:9.1f} MiB, {row['seconds']:7.2f} s", flush=True
        )
        rows.append(row)
    return {
        "device": args.device,
        "machine": _machine(args.device),
        "shape": {k: getattr(args, k) for k in ("vocab", "hidden", "sequences", "length", "topk", "alpha")},
        "rows": rows,
    }


def _table(result: dict) -> str:
    s = result["shape"]
    naive = next(r for r in result["rows"] if r["variant"] == "naive")
    how = (
        "peak RSS growth (`ru_maxrss`) in a fresh process"
        if result["device"] == "cpu"
        else "`torch.cuda.max_memory_allocated()` growth in a fresh process"
    )
    n_tokens, w_mib = s["sequences"] * s["length"], s["vocab"] * s["hidden"] * 4 / 2**20
    header = ["variant", "chunk rows", "peak memory (MiB)", "vs naive", "forward + backward (ms)"]
    header += ["sum of divergence", "grad norm"]
    lines = [
        f"**{result['device'].upper()}**: {result['machine']}. V = {s['vocab']:,}, H = {s['hidden']}, "
        f"{s['sequences']} x {s['length']} tokens (N = {n_tokens}), K = {s['topk']} + tail, "
        f"alpha = {s['alpha']}, fp32. Memory: {how}, over the inputs (W is {w_mib:.0f} MiB).",
        "",
        "| " + " | ".join(header) + " |",
        "| --- |" + " ---: |" * (len(header) - 1),
    ]
    for r in result["rows"]:
        name, _, chunk = r["variant"].partition(":")
        cells = [
            "`distill_from_logits` (naive)" if name == "naive" else "`chunked_distill`",
            f"{chunk} (default)" if chunk and int(chunk) == SDPOConfig().logit_chunk_size else chunk or "all",
            f"{r['peak_bytes'] / 2**20:,.0f}",
            f"{r['peak_bytes'] / naive['peak_bytes']:.1%}",
            f"{r['seconds'] * 1e3:,.1f}",
            f"{r['checksum'][0]:.4f}",
            f"{r['checksum'][1]:.4f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write_docs(path: Path, result: dict) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = text[text.index(BEGIN) + len(BEGIN) : text.index(END)] if BEGIN in text else ""
    tables = dict(
        re.findall(r"<!-- loss-memory:([\w-]+) -->\n(.*?)\n<!-- /loss-memory:\1 -->", section, re.S)
    )
    shape = result["shape"]
    key = (
        result["device"]
        if (shape["sequences"], shape["length"]) == (8, 256)
        else (f"{result['device']}-{shape['sequences']}x{shape['length']}")
    )
    tables[key] = _table(result)
    body = "\n\n".join(
        f"<!-- loss-memory:{d} -->\n{t}\n<!-- /loss-memory:{d} -->" for d, t in sorted(tables.items())
    )
    new = f"""{BEGIN}
## Loss memory: chunked vs full logits

Forward + backward of the SDPO loss (`sdpo_unsloth.loss`) at Qwen2.5-0.5B's shape. `naive` materialises
full [N, V] logits and log-probs for both sides (`distill_from_logits` on `hidden @ W.T`); `chunked_distill`
projects `chunk` rows at a time and keeps only [N, H] gradient rows for the backward, so its peak is about
two [chunk, V] fp32 buffers (student probabilities, teacher logits): at V = 151,936, 0.29 GiB at the
default `SDPOConfig.logit_chunk_size=256`, 1.16 GiB at 1024. Each variant runs in a fresh subprocess; the first run sets the
peak, time is the median of the runs (CPU times come from a shared 2-core machine: indicative only). The last
two columns check that both variants compute the same loss and gradient.

```
{COMMAND}
python benchmarks/memory/loss_memory.py --device cuda --chunk-sizes 1024 256 128 --repeats 5 \\
    --write-docs docs/benchmarks.md
python benchmarks/memory/loss_memory.py --device cuda --length 1024 --chunk-sizes 1024 256 --repeats 3 \\
    --write-docs docs/benchmarks.md
```

{body}
{END}"""
    if BEGIN in text:
        text = text[: text.index(BEGIN)] + new + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + "\n\n" + new + "\n"
    path.write_text(text)


def main() -> None:
    args = _parse()
    if args.worker:
        print(json.dumps(_worker(args)))
        return
    result = json.loads(args.from_json.read_text()) if args.from_json else _run(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(_table(result))
    if args.write_docs:
        _write_docs(args.write_docs, result)


if __name__ == "__main__":
    main()
