#!/usr/bin/env bash
# The GPU verification run, in one command, on a bare GPU machine without network:
#   bash benchmarks/gpu_check.sh [RESULTS_DIR]
# 1. installs the project (no deps: the machine has torch/triton; the extensions build here with nvcc),
# 2. runs the kernel tests on the GPU (Triton and CUDA backends against the references),
# 3. runs the native-op tests under compute-sanitizer memcheck at small shapes,
# 4. runs the GPU benchmarks through `python -m benchmarks` (JSON, tables and plots),
# leaving every log and result in RESULTS_DIR (default: $OUT if set, else benchmarks/results/gpu-check).
set -uo pipefail
cd "$(dirname "$0")/.."
results=${1:-${OUT:-benchmarks/results/gpu-check}}
mkdir -p "$results"
export PYTHONUNBUFFERED=1 SPARROW_CUDA=1 SPARROW_REQUIRE_EXTENSIONS=1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-16}
# H100/H200 only by default: the build is the slowest step of the run.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
status=0
step() { echo; echo "=== $1"; }

step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$results/env.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$results/env.txt"

step "install"
python3 -m pip install --no-build-isolation --no-deps -e . > "$results/install.log" 2>&1 || { tail -50 "$results/install.log"; exit 1; }
python3 -m sparrow info | tee -a "$results/env.txt"

# The kernel tests: everything that exercises the GPU backends. (The data/tokenizer tests need `datasets`,
# which GPU machines lack; CI runs them.)
KERNEL_TESTS=$(ls tests/test_backends.py tests/test_native_ops.py tests/test_*ops*.py tests/test_convergence.py 2>/dev/null | sort -u)

step "kernel tests on the GPU"
python3 -m pytest -q -x $KERNEL_TESTS -p no:cacheprovider --junitxml="$results/pytest.xml" 2>&1 | tee "$results/pytest.log" | tail -25
[ "${PIPESTATUS[0]}" = 0 ] || status=1

step "compute-sanitizer memcheck (native ops, small shapes)"
if command -v compute-sanitizer > /dev/null; then
  compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -x tests/test_native_ops.py \
    -p no:cacheprovider > "$results/memcheck.log" 2>&1
  rc=$?; tail -5 "$results/memcheck.log"; [ $rc = 0 ] || { echo "memcheck failed ($rc)"; status=1; }
else
  echo "compute-sanitizer not found" | tee "$results/memcheck.log"; status=1
fi

step "benchmarks"
# bench_bpe is a CPU benchmark whose oracles (tiktoken and the offline vocabularies) are test-only packages
# this machine lacks; the CPU machines run it.
only=()
for bench in benchmarks/bench_*.py; do
  name=$(basename "$bench" .py); name=${name#bench_}
  [ "$name" = bpe ] || only+=(--only "$name")
done
python3 -m benchmarks "${only[@]}" --results "$results" 2>&1 | tee "$results/bench.log" | tail -60
[ "${PIPESTATUS[0]}" = 0 ] || { echo "benchmarks failed"; status=1; }

echo; echo "results in $results"; exit $status
