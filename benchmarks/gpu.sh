#!/usr/bin/env bash
# The GPU check: copy bandwidth, the GPU-only tests, the kernel benchmarks, one table.
# For an offline host with one NVIDIA GPU and torch, triton, pytest, hypothesis and pytest-benchmark
# preinstalled; d2f is not installed but staged on PYTHONPATH in its installed layout (src/d2f with
# kernels/ as d2f/kernels). Whole run: under 5 minutes. Output also lands in $OUT (or a temp folder).
set -euo pipefail
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
python -c "import pytest_benchmark" 2>/dev/null || { echo "gpu.sh needs pytest-benchmark (and py-cpuinfo)"; exit 2; }
stage=$(mktemp -d)
mkdir -p "$stage/d2f"
cp -r src/d2f/. "$stage/d2f/"
cp -r kernels "$stage/d2f/kernels"
export PYTHONPATH="$stage${PYTHONPATH:+:$PYTHONPATH}"
out=${OUT:-$(mktemp -d)}

copy_gbps=$(python - <<'PY'
import torch, triton
x = torch.empty(256 * 2**20, device="cuda")  # 1 GiB
y = torch.empty_like(x)
for _ in range(3):
    y.copy_(x)
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
times = []
for _ in range(20):
    start.record(); y.copy_(x); end.record(); torch.cuda.synchronize()
    times.append(start.elapsed_time(end) / 1e3)
gbps = 2 * x.numel() * 4 / sorted(times)[len(times) // 2] / 1e9
import sys
print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}", file=sys.stderr)
print(f"# copy bandwidth (1 GiB copy_, median of 20): {gbps:.0f} GB/s", file=sys.stderr)
print(f"{gbps:.1f}")
PY
)

timeout 120 python -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels.py 2>&1 | tee "$out/gpu-tests.log" | tail -n 3
timeout 170 python -m pytest -q -p no:cacheprovider benchmarks --benchmark-only -k "not reference or 64x4x96x96" \
    --benchmark-max-time=0.2 --benchmark-min-rounds=10 --benchmark-json="$out/bench-gpu.json" >"$out/bench.log" 2>&1 \
    || { tail -n 30 "$out/bench.log"; exit 1; }
python benchmarks/table.py "$out/bench-gpu.json" "$copy_gbps" | tee "$out/table.txt"
