#!/usr/bin/env bash
# The GPU check: copy bandwidth; every test marked gpu and the kernel tests compiled for real; the benchmarks'
# own correctness checks; the kernel benchmarks; one table. Every log starts with the commit it checked.
# For an offline host with one NVIDIA GPU and torch, triton, pytest, hypothesis and pytest-benchmark
# preinstalled; d2f is not installed but staged on PYTHONPATH in its installed layout (src/d2f with
# kernels/ as d2f/kernels). Wheels carried in .whl/ (diffusers and what it needs, for the tests and rows
# that sample a UNet) are installed first, offline. Each stage has its own time limit and its own log, so a
# slow stage (the torch.compile baselines compile once per shape and dtype) cannot take the others' results
# with it. Output also lands in $OUT (or a temp folder). D2F_COMMIT names the commit where .git is absent.
set -uo pipefail
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
python -c "import pytest_benchmark" 2>/dev/null || { echo "gpu.sh needs pytest-benchmark (and py-cpuinfo)"; exit 2; }
stage=$(mktemp -d)
mkdir -p "$stage/d2f"
cp -r src/d2f/. "$stage/d2f/"
cp -r kernels "$stage/d2f/kernels"
export PYTHONPATH="$stage${PYTHONPATH:+:$PYTHONPATH}"
out=${OUT:-$(mktemp -d)}
status=0
commit=${D2F_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
header="# d2f commit $commit, $(date -u +%FT%TZ)"
echo "$header" | tee "$out/commit.txt"
if compgen -G ".whl/*.whl" >/dev/null; then
    python -m pip install -q --no-index --no-deps .whl/*.whl >"$out/wheels.log" 2>&1 || status=1
fi

copy_gbps=$(python - <<'PY'
import sys
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
print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}", file=sys.stderr)
print(f"# copy bandwidth (1 GiB copy_, median of 20): {gbps:.0f} GB/s", file=sys.stderr)
print(f"{gbps:.1f}")
PY
) 2> >(tee "$out/versions.txt" >&2)

tests() {  # NAME LIMIT PYTEST_ARGS...
    local name=$1 limit=$2
    shift 2
    echo "## $name"
    { echo "$header"; timeout "$limit" python -m pytest -q -p no:cacheprovider -rs "$@"; } >"$out/$name.log" 2>&1 \
        || status=1
    tail -n 15 "$out/$name.log"
}
# Every CUDA-only test (bf16 kernels, large shapes, the automatic switch to Triton, graph capture, devices),
# then the kernel tests that also run interpreted on the CPU, compiled for real here.
tests gpu-tests 240 -m gpu tests
tests gpu-kernel-tests 180 -m "not gpu" tests/test_kernels.py tests/test_draws.py tests/test_deferred.py
# The benchmarks' own checks that each baseline computes what d2f computes, on this device.
tests bench-checks 180 --benchmark-disable -k same benchmarks

bench() {  # NAME LIMIT PYTEST_ARGS...
    local name=$1 limit=$2
    shift 2
    echo "## benchmarks: $name"
    timeout "$limit" python -m pytest -q -p no:cacheprovider --benchmark-only --benchmark-max-time=0.2 \
        --benchmark-min-rounds=10 --benchmark-json="$out/bench-$name.json" "$@" >"$out/bench-$name.log" 2>&1 \
        || { status=1; tail -n 20 "$out/bench-$name.log"; }
}
bench kernels 120 benchmarks/bench_loss.py benchmarks/bench_step.py -k "triton or torch or (reference and 64x4x96x96)"
bench compile 180 benchmarks/bench_loss.py benchmarks/bench_step.py -k compile
# The trainer's draws: the one-launch Philox kernel against its torch path and the earlier per-sample scheme.
bench draws 60 benchmarks/bench_draws.py
# SD 2.1's UNet architecture (random weights), one train step, d2f against diffusion: needs diffusers, which
# the card's image lacks (install its wheel, carried over, first); without it these rows skip.
bench sd21 300 -rs benchmarks/bench_sd_train_step.py
# The teacher's training step against a plain diffusers step, and 25-call sampling against diffusers' DDIM loop
# (diffusers again; launch-bound at this size, which is what the zero-overhead issue is about).
bench trainstep 120 -rs benchmarks/bench_train_step.py
bench sample 120 -rs benchmarks/bench_sample.py
python benchmarks/table.py --copy-gbps "$copy_gbps" "$out"/bench-*.json | tee "$out/table.txt"
echo "## wall clock against the kernels' device time"
timeout 150 python benchmarks/device_time.py "$copy_gbps" 2>&1 | tee "$out/device-time.txt" || status=1
exit $status
