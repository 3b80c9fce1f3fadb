#!/usr/bin/env bash
# The GPU verification run, on a bare GPU machine without network:
#   bash benchmarks/gpu_check.sh [--brief] [STAGE ...]
# Stages, in this order when none is named:
#   build     the project installed in place (no deps: the machine has torch/triton), its extensions (sparrow._C for
#             sm_90 and sparrow._bpe) built with nvcc; skipped when already built from the same sources
#   ceilings  the device's measured ceilings: device-to-device copy GB/s and a bf16 8192^3 matmul's TFLOP/s
#   native-errors  does an exception thrown in sparrow._C reach Python (benchmarks/gpu_native_errors.py)?
#   tests     the kernel tests on the GPU (Triton and CUDA backends against the references), 8 pytest workers
#   memcheck  the CUDA and Triton op tests under compute-sanitizer memcheck, at the tests' small shapes
#   rmsnorm rope attention train moe dispatch
#             the GPU benchmarks (JSON + plots; each writes its JSON after every row; dispatch: host time per op call)
# --brief: a GPU lent for minutes. Each stage has a time limit and the benchmarks sweep a few shapes rather than the
# full grid; a stage that runs out of time is reported and the next one starts.
# Results and logs go to RESULTS_DIR (default: benchmarks/results/gpu-check); when $OUT is set (the lent machine), the
# folder is also packed into $OUT/gpu-check.tgz after every stage, so a run cut short still brings back what it did.
set -uo pipefail
cd "$(dirname "$0")/.."
brief=0
if [ "${1:-}" = --brief ]; then brief=1; shift; fi
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(build ceilings native-errors tests memcheck rmsnorm rope attention train moe dispatch)
results=${RESULTS_DIR:-benchmarks/results/gpu-check}
mkdir -p "$results"
export PYTHONUNBUFFERED=1 SPARROW_CUDA=1 SPARROW_REQUIRE_EXTENSIONS=1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-16}
# H100/H200 only: the build is the slowest step of the run.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# Wheels carried to a machine that cannot reach a package index (Liger-Kernel, for the comparison rows).
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/sparrow-site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/sparrow-site
fi
status=0
# limit N: a `timeout` of N seconds to put before a command under --brief, nothing otherwise.
limit() { if [ $brief = 1 ]; then echo "timeout --signal=INT --kill-after=15 $1"; fi; }
pack() { [ -n "${OUT:-}" ] && tar -czf "$OUT/gpu-check.tgz" -C "$results" . 2>/dev/null; true; }
finish() { # stage name, exit code
  local took=$(( $(date +%s) - stage_start ))
  if [ "$2" = 124 ] || [ "$2" = 130 ] || [ "$2" = 137 ]; then
    echo "--- $1: stopped at its time limit after ${took} s"; status=1
  elif [ "$2" != 0 ]; then
    echo "--- $1: FAILED (exit $2) after ${took} s"; status=1
  else
    echo "--- $1: ok in ${took} s"
  fi
  echo "$1 $2 ${took}" >> "$results/stages.txt"
  pack
}

# The kernel tests: everything that exercises the GPU backends. (The data/tokenizer tests need `datasets`, which
# GPU machines lack; CI runs them.)
KERNEL_TESTS="tests/test_backends.py tests/test_native_ops.py tests/test_attention_ops.py tests/test_custom_ops.py
  tests/test_moe_ops.py tests/test_reference_ops.py tests/test_triton_ops.py tests/test_convergence.py
  tests/test_hf_patching.py"

for stage in "${stages[@]}"; do
  echo; echo "=== $stage ($(date -u +%H:%M:%S))"
  stage_start=$(date +%s)
  case $stage in
    build)
      { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
        python3 -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
        nproc; } 2>&1 | tee "$results/env.txt"
      # By content, not mtime: each call to a lent machine copies the working tree afresh.
      sources=$(cat setup.py $(find csrc -type f | sort) | sha256sum | cut -d' ' -f1)
      if [ "$(cat build/.sparrow-sources 2> /dev/null)" = "$sources" ] \
          && python3 -c "import torch, sparrow._C, sparrow._bpe, sparrow.kernels" 2> /dev/null; then
        echo "extensions already built from these sources"; rc=0
      else
        # An editable install maps kernels/ to sparrow.kernels; where pip cannot install, the extensions are built
        # in place and a link stands in for that mapping.
        $(limit 300) python3 -m pip install --no-build-isolation --no-deps -e . > "$results/build.log" 2>&1
        rc=$?
        if [ $rc != 0 ]; then
          tail -20 "$results/build.log"; echo "pip install failed: building in place"
          $(limit 300) python3 setup.py build_ext --inplace >> "$results/build.log" 2>&1 && ln -sfn ../kernels sparrow/kernels
          rc=$?
        fi
        [ $rc = 0 ] && mkdir -p build && echo "$sources" > build/.sparrow-sources
        [ $rc = 0 ] || tail -40 "$results/build.log"
      fi
      [ $rc = 0 ] && python3 -m sparrow info 2>&1 | tee -a "$results/env.txt"
      finish build $rc
      [ $rc = 0 ] || { echo "build failed: nothing else can run"; exit 1; } ;;
    ceilings)
      $(limit 60) python3 - "$results/ceilings.json" << 'EOF' 2>&1 | tee "$results/ceilings.log"
import json, sys, torch
from triton.testing import do_bench
sys.path.insert(0, ".")
from benchmarks.common import device_info
x = torch.randn(2**30 // 2, device="cuda", dtype=torch.bfloat16)  # 1 GiB, far beyond L2
y = torch.empty_like(x)
copy_ms = do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
mm_ms = do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
result = dict(device_info(), copy_gbs=2 * x.numel() * 2 / copy_ms / 1e6, bf16_matmul_tflops=2 * 8192**3 / mm_ms / 1e9,
              method="median of do_bench: 1 GiB bf16 device-to-device copy (bytes read + written); 8192^3 bf16 matmul on random data")
json.dump(result, open(sys.argv[1], "w"), indent=2)
print(f"copy {result['copy_gbs']:.0f} GB/s, bf16 matmul {result['bf16_matmul_tflops']:.0f} TFLOP/s")
EOF
      finish ceilings ${PIPESTATUS[0]} ;;
    native-errors)
      $(limit 120) python3 benchmarks/gpu_native_errors.py --out "$results/native_errors.json" 2>&1 \
        | tee "$results/native_errors.log"
      finish native-errors ${PIPESTATUS[0]} ;;
    tests)
      workers=()
      python3 -c "import xdist" 2> /dev/null && workers=(-n 8)
      # Under --brief each new shape compiles one tile instead of timing them all (kernels/attention.py _tuned).
      tuning=()
      [ $brief = 1 ] && tuning=(SPARROW_AUTOTUNE=0)
      env "${tuning[@]}" $(limit 300) python3 -m pytest -q -rfE "${workers[@]}" $KERNEL_TESTS -p no:cacheprovider \
        --junitxml="$results/pytest.xml" > "$results/pytest.log" 2>&1
      rc=$?; tail -30 "$results/pytest.log"; finish tests $rc ;;
    memcheck)
      if command -v compute-sanitizer > /dev/null || [ -x "$CUDA_HOME/bin/compute-sanitizer" ]; then
        sanitizer=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
        # The CUDA ops' tests, then the Triton ops' (their kernels are cached by the tests stage). The argument-error
        # tests launch no kernel and have their own stage (native-errors): one crashed the whole run on an H200.
        # One tile per shape (SPARROW_AUTOTUNE=0): under the sanitizer, timing every tile would take most of a lease.
        SPARROW_AUTOTUNE=0 $(limit 200) "$sanitizer" --tool memcheck --error-exitcode 9 --print-limit 20 python3 -m pytest -q \
          tests/test_native_ops.py tests/test_triton_ops.py -k "(cuda or not cpu) and not argument_errors" \
          -p no:cacheprovider > "$results/memcheck.log" 2>&1
        rc=$?; grep -E "ERROR SUMMARY|passed|failed|Invalid|error" "$results/memcheck.log" | tail -12
      else
        echo "compute-sanitizer not found" | tee "$results/memcheck.log"; rc=1
      fi
      finish memcheck $rc ;;
    rmsnorm|rope|attention|train|moe|dispatch)
      args=()
      if [ $brief = 1 ]; then
        case $stage in
          rmsnorm) args=(--shapes 16384x2048,16384x8192); secs=150 ;;
          rope) args=(--shapes 4x4096x16,8x8192x32); secs=90 ;;
          attention) args=(--seqlens 4096,16384,1024 --head-dims 128,64 --impl sparrow-triton --impl sparrow-cuda
                           --impl sdpa-flash --impl sdpa-cudnn --impl flash-attn); secs=240 ;;
          train) args=(--presets 124m --variants reference,triton,cuda,reference+compile,triton+compile
                       --batch-size 8 --warmup 2 --steps 6 --no-transformers); secs=240 ;;
          moe) args=(); secs=150 ;;  # autotunes each new shape (90 s was not enough on the H200)
          dispatch) args=(--calls 5000); secs=60 ;;
        esac
      fi
      $(limit ${secs:-0}) python3 "benchmarks/bench_$stage.py" --out "$results/$stage.json" "${args[@]}" \
        > "$results/$stage.log" 2>&1
      rc=$?; tail -25 "$results/$stage.log"
      python3 -c "from pathlib import Path; from benchmarks.__main__ import plot; plot(Path('$results/$stage.json'))" \
        > /dev/null 2>&1 || true
      finish "$stage" $rc ;;
    *) echo "unknown stage $stage"; status=1 ;;
  esac
done
echo; echo "results in $results"; cat "$results/stages.txt"; exit $status
