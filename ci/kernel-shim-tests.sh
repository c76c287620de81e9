#!/usr/bin/env bash
# Runs the CUDA kernels on the CPU under sanitizers: kernels/shim_tests/harness.cpp (which
# #includes every kernels/*.cu) built against kernels/shim/cuda_cpu_shim.h with ASan+UBSan and
# with TSan (one OS thread per CUDA thread, so missing __syncthreads/__syncwarp are races),
# then fed the inputs the Rust comparison tests write (MOE_SHIM_HARNESS points the test at the
# sanitizer build). Needs g++ only: no CUDA headers.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-target/shim-sanitizers}
mkdir -p "$out"
out=$(cd "$out" && pwd)
flags=(-std=c++20 -O1 -g -fno-omit-frame-pointer -pthread -DMOE_SHIM_THREADS -Ikernels
       -include kernels/shim/cuda_cpu_shim.h kernels/shim_tests/harness.cpp)
g++ "${flags[@]}" -fsanitize=address,undefined -fno-sanitize-recover=undefined -o "$out/harness.asan" &
g++ "${flags[@]}" -fsanitize=thread -o "$out/harness.tsan" &
wait
fail=0
# TSan runs an OS thread per CUDA thread under instrumentation: the first cases of each test
for san in asan tsan; do
  max_runs=""
  [ "$san" = tsan ] && max_runs=${TSAN_MAX_RUNS:-4}
  if ASAN_OPTIONS=detect_leaks=0 TSAN_OPTIONS=halt_on_error=1 MOE_SHIM_MAX_RUNS=$max_runs \
     MOE_SHIM_HARNESS=$out/harness.$san timeout 1200 \
     cargo test -q -p moe-kernels --test shim --locked -- --test-threads=1; then
    echo "shim $san: ok"
  else
    echo "shim $san: FAILED"
    fail=1
  fi
done
exit $fail
