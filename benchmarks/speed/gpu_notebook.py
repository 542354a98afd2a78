"""Run a notebook's code cells in order, in one namespace, as "Run all" would, and time each cell.

For machines without Jupyter (the device machine has no ipykernel): the cells run in this process, with the
install cell skipped (`SDPO_NOTEBOOK_CI=1`), parameters injected after the cell tagged `parameters` (as
papermill does), matplotlib drawing off-screen, and `IPython.display` replaced by a recorder when IPython is
missing (said in the result). `--t4` makes torch report no bf16 before anything is imported, so the kit
picks fp16 as on a T4 (the model's dtype and `fp16=True` for training; unsloth's banner still reads bf16 support from
the device's compute capability). Stops at the first failing cell, as a notebook does.

    python benchmarks/speed/gpu_notebook.py notebooks/quickstart_addition.ipynb --t4 \
        --param MODEL='"embedded"' --out $OUT/quickstart.json

Writes a JSON record: per cell its seconds, printed output (tail) and peak CUDA memory so far; the error and
traceback of a failing cell; `result.before` / `result.after` when the notebook made a `result`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path


class _Tee(io.TextIOBase):
    """Write to the real stream and keep a copy."""

    def __init__(self, stream):
        self.stream, self.parts = stream, []

    def write(self, text):
        self.parts.append(text)
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()

    @property
    def encoding(self):
        return self.stream.encoding

    def fileno(self):
        return self.stream.fileno()

    def isatty(self):
        return self.stream.isatty()


def _display_recorder(shown: list[str]) -> None:
    """Install a stand-in `IPython.display` (HTML, Markdown, display) that records what would be shown."""

    class _Shown:
        def __init__(self, data=None, **kwargs):
            self.data = data

    def display(*objs, **kwargs):
        for obj in objs:
            shown.append(f"{type(obj).__name__}: {len(str(getattr(obj, 'data', obj)))} chars")

    ipython = types.ModuleType("IPython")
    ipython.version_info = (8, 24, 0, "recorder")  # matplotlib reads both: no shell, nothing to hook into
    ipython.get_ipython = lambda: None
    module = types.ModuleType("IPython.display")
    module.HTML = type("HTML", (_Shown,), {})
    module.Markdown = type("Markdown", (_Shown,), {})
    module.display = display
    ipython.display = module
    sys.modules["IPython"], sys.modules["IPython.display"] = ipython, module


def code_cells(path: Path, params: dict[str, str]) -> list[tuple[str, str]]:
    """(label, source) of each non-empty code cell in order, the injected parameters after the `parameters` cell."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    sources, injected = [], False
    for index, cell in enumerate(cells):
        source = "".join(cell["source"])
        if cell["cell_type"] != "code" or not source.strip():
            continue
        if any(line.lstrip().startswith(("!", "%")) for line in source.splitlines()):
            raise SystemExit(f"{path}: cell {index} uses shell or magic syntax, which this runner cannot run")
        sources.append((f"cell {index}", source))
        if "parameters" in cell.get("metadata", {}).get("tags", []) and params:
            sources.append(("injected parameters", "\n".join(f"{k} = {v}" for k, v in params.items())))
            injected = True
    if params and not injected:
        raise SystemExit(f"{path}: --param given, but no code cell is tagged `parameters`")
    return sources


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook", type=Path)
    parser.add_argument(
        "--param", action="append", default=[], help="NAME=python-expression, after `parameters`"
    )
    parser.add_argument("--t4", action="store_true", help="torch reports no bf16 (a T4's fp16 path)")
    parser.add_argument(
        "--workdir", default=None, help="where the cells run (default: a new temporary folder)"
    )
    parser.add_argument("--out", type=Path, required=True, help="JSON record to write")
    args = parser.parse_args(argv)
    bad = [item for item in args.param if "=" not in item]
    if bad:
        parser.error(f"--param takes NAME=python-expression, got {bad}")
    params = dict(item.split("=", 1) for item in args.param)
    sources = code_cells(args.notebook.resolve(), params)
    args.out = args.out.resolve()  # before the cells run elsewhere
    args.out.parent.mkdir(parents=True, exist_ok=True)

    os.environ.setdefault("SDPO_NOTEBOOK_CI", "1")  # the install cell installs nothing
    os.environ.setdefault("MPLBACKEND", "Agg")
    import torch

    cuda = torch.cuda.is_available()
    if args.t4:
        torch.cuda.is_bf16_supported = lambda *a, **k: False
    shown: list[str] = []
    try:
        import IPython.display  # noqa: F401

        ipython = "installed"
    except ImportError:
        _display_recorder(shown)
        ipython = "recorder (IPython not installed)"

    record = {
        "notebook": str(args.notebook),
        "params": params,
        "t4_fp16": args.t4,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "ipython_display": ipython,
        "cells": [],
        "status": "running",
    }
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="notebook-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)
    namespace: dict = {"__name__": "__main__"}
    start = time.perf_counter()
    for label, source in sources:
        tee = _Tee(sys.stdout)
        began = time.perf_counter()
        entry: dict = {"cell": label, "first_line": source.strip().splitlines()[0][:80]}
        try:
            with contextlib.redirect_stdout(tee):
                exec(compile(source, f"<{label}>", "exec"), namespace)
        except BaseException as err:  # a notebook shows any error and stops there
            entry["error"] = f"{type(err).__name__}: {err}"
            entry["traceback"] = traceback.format_exc()[-6000:]
            record["status"] = "failed"
        entry["seconds"] = round(time.perf_counter() - began, 2)
        entry["output_tail"] = "".join(tee.parts)[-2000:]
        if cuda:
            entry["peak_cuda_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        record["cells"].append(entry)
        print(
            f"[gpu_notebook] {label}: {entry['seconds']} s{' FAILED' if 'error' in entry else ''}",
            flush=True,
        )
        args.out.write_text(json.dumps(record, indent=1))
        if "error" in entry:
            print(entry["traceback"], file=sys.stderr)
            break
    if record["status"] == "running":
        record["status"] = "ok"
    record["total_s"] = round(time.perf_counter() - start, 1)
    result = namespace.get("result")
    for name in ("before", "after", "adapter_dir"):
        if result is not None and hasattr(result, name):
            record[name] = getattr(result, name)
    if result is not None and hasattr(result, "log_history"):
        record["log_history"] = result.log_history
    record["displayed"] = shown
    args.out.write_text(json.dumps(record, indent=1, default=str))
    print(f"[gpu_notebook] {record['status']} in {record['total_s']} s -> {args.out}")
    return 0 if record["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
