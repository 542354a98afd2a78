#!/usr/bin/env bash
# The GPU benchmark, as one command on the device machine (H100/H200, python3 = /opt/torch/.venv, torch 2.11+cu130,
# transformers 5.17.0, accelerate 1.15.0 already there). Run from the repo root with `.whl` carried:
#
#     bash benchmarks/speed/gpu_run.sh                # default stages, results in $OUT (gpu_step.json, .jsonl, gpu_run.log)
#     bash benchmarks/speed/gpu_run.sh --budget 300   # extra arguments go to benchmarks/speed/gpu_step.py
#     bash benchmarks/speed/gpu_run.sh --tests --stages unsloth:1.5b   # first tests/gpu (log: $OUT/gpu_tests.log)
#
# .whl/ (ignored by git through .git/info/exclude) holds only what the machine lacks, for cp312 manylinux x86_64,
# built here by `bash benchmarks/speed/gpu_wheels.sh` (the list, the versions and the two trimmed wheels are there).
# xformers is left out (unsloth falls back to SDPA).
# Nothing here replaces the machine's torch, transformers, accelerate, triton or numpy: none of them is in .whl.
set -uo pipefail
run_tests=0
if [ "${1:-}" = "--tests" ]; then run_tests=1; shift; fi
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/../.."

# Two folders: /tmp/site for every stage, /tmp/site_unsloth (unsloth and what only it needs) on the path of the
# unsloth stages alone, so the transformers stages never import torchao, diffusers, pydantic, ...
base=() extra=()
for w in .whl/*.whl; do
    case "$(basename "$w")" in
        trl-*|datasets-*|dill-*|multiprocess-*|peft-*|bitsandbytes-*) base+=("$w") ;;
        typing_extensions-*)
            python3 -c "import sys; from importlib.metadata import version as v; from packaging.version import Version as V; \
sys.exit(0 if V(v('typing_extensions')) >= V('4.16.0') else 1)" 2>/dev/null || base+=("$w") ;;
        *) extra+=("$w") ;;
    esac
done
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${base[@]}" \
    && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site_unsloth \
    "${extra[@]}" || { echo "gpu_run: wheel install failed"; exit 1; }
echo "gpu_run: installed ${#base[@]} wheels into /tmp/site and ${#extra[@]} into /tmp/site_unsloth in $(( $(date +%s) - t0 ))s"
export GPU_STEP_UNSLOTH_PATH=/tmp/site_unsloth
export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 WANDB_DISABLED=true

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONPATH=/tmp/site_unsloth:$PYTHONPATH python3 - <<'EOF'
import sys
from importlib.metadata import version, PackageNotFoundError
import importlib.util
print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "transformers", "accelerate", "trl", "peft", "bitsandbytes", "datasets", "unsloth", "unsloth_zoo",
             "triton", "typing_extensions", "pydantic", "torchao", "xformers"):
    try:
        spec = importlib.util.find_spec(name)
        where = spec.origin.rsplit("/", 3)[0] if spec and spec.origin else "?"
        print(f"  {name:18s} {version(name):14s} {where}")
    except PackageNotFoundError:
        print(f"  {name:18s} (not installed)")
EOF

if [ "$run_tests" = 1 ]; then  # the GPU tests, bounded so that the benchmark still runs after them
    t0=$(date +%s)
    SDPO_UNSLOTH_BACKEND=unsloth PYTHONPATH=/tmp/site_unsloth:$PYTHONPATH timeout "${GPU_TESTS_TIMEOUT:-200}" \
        python3 -m pytest -m gpu tests/gpu -o addopts= -v -rs -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
    echo "gpu_run: tests/gpu exit ${PIPESTATUS[0]} in $(( $(date +%s) - t0 ))s" | tee -a "$OUT/gpu_tests.log"
fi

python3 benchmarks/speed/gpu_step.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_run.log"
