#!/usr/bin/env bash
# Build the wheel bundle `.whl/` that benchmarks/speed/gpu_run.sh installs on the device machine (cp312,
# manylinux x86_64; that machine has torch, transformers, accelerate, triton and numpy but no package index).
# Run here, from the repo root, where pip reaches PyPI:
#
#     bash benchmarks/speed/gpu_wheels.sh          # -> .whl/ (about 33 MB), ignored through .git/info/exclude
#
# Two wheels are rewritten smaller, keeping only what is imported: bitsandbytes with only its CPU and CUDA 13.0/13.2
# libraries (the machine runs CUDA 13), unsloth without studio/ (its web app). Their RECORD lists only the kept files.
set -euo pipefail
cd "$(dirname "$0")/../.."
dest=.whl
rm -rf "$dest" && mkdir -p "$dest"  # gpu_run.sh installs every wheel here: no leftovers of another bundle
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info && echo /.whl/ >> .git/info/exclude; }
platforms=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${p}_x86_64")
done
wheels=(
    trl==1.14.2 datasets==4.8.5 dill==0.4.1 multiprocess==0.70.19 peft==0.21.2 bitsandbytes==0.50.2
    unsloth==2026.10.9 unsloth_zoo==2026.10.9 tyro==1.0.17 docstring_parser==0.18.0 typeguard==4.6.1 shtab==1.13.0
    msgspec==0.23.0 cut_cross_entropy==25.1.1 torchao==0.18.0 hf_transfer==0.1.9 diffusers==0.42.1 json5==0.17.3
    nest_asyncio==1.6.0 structlog==26.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0
    typing_inspection==0.4.5 typing_extensions==4.16.0 gguf==0.19.0
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$dest" "${wheels[@]}"

# Rewrite a wheel keeping the files for which the python predicate `keep(name)` is true.
trim() {
    python3 - "$1" "$2" <<'EOF'
import base64, hashlib, sys, zipfile
path, rule = sys.argv[1], sys.argv[2]
keep = eval(f"lambda name: {rule}")
with zipfile.ZipFile(path) as src:
    names = [n for n in src.namelist() if keep(n) or n.endswith(".dist-info/RECORD")]
    infos = {n: src.getinfo(n) for n in names}  # modes and timestamps kept
    data = {n: src.read(n) for n in names}
record = next(n for n in names if n.endswith(".dist-info/RECORD"))
lines = []
for n in names:
    if n == record:
        lines.append(f"{n},,")
    else:
        digest = base64.urlsafe_b64encode(hashlib.sha256(data[n]).digest()).rstrip(b"=").decode()
        lines.append(f"{n},sha256={digest},{len(data[n])}")
data[record] = ("\n".join(lines) + "\n").encode()
with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as out:
    for n in names:
        out.writestr(infos[n], data[n], compress_type=zipfile.ZIP_DEFLATED)
print(f"trimmed {path}: kept {len(names)} files")
EOF
}
trim "$dest"/bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl \
    "not name.startswith('bitsandbytes/libbitsandbytes_') or name.endswith(('_cpu.so', 'cuda130.so', 'cuda132.so'))"
trim "$dest/unsloth-2026.10.9-py3-none-any.whl" "not name.startswith('studio/')"
du -sh "$dest"
