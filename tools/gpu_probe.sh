# Kernel-level probe on a lent GPU (from the repository root: bash tools/gpu_probe.sh [window,attention,host,
# bench]; results under $OUT, at most 8 files): compiled-Triton window tests, per-kernel times against the
# byte/flop floors (benchmarks/window_kernels.py, benchmarks/attention_kernels.py), host time per call
# (benchmarks/host_overhead.py), and the gpu-check window cases against timm / Flex. About 4-5 minutes
# with a fresh machine; run each part alone with its name.
export PYTHONPATH=. VITKERNELS_CACHE_DIR=$OUT/cache TRITON_INTERPRET=0
parts=${1:-window,attention,host,bench}
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu --format=csv,noheader
if [[ $parts == *window* ]]; then
  timeout 150 python3 -m pytest -q -rfE -n 8 -p no:cacheprovider -m "gpu or triton" tests/ops/test_window_attention_triton.py tests/ops/test_tuning.py -k "window or Window" > $OUT/tests.log 2>&1; echo "window tests rc=$?"; tail -4 $OUT/tests.log
  timeout 90 python3 -m benchmarks.window_kernels --json $OUT/window_kernels.json 2>&1 | grep -v Warn | tail -40
fi
if [[ $parts == *attention* ]]; then
  timeout 150 python3 -m benchmarks.attention_kernels --json $OUT/attention_kernels.json 2>&1 | grep -v Warn | tail -45
fi
if [[ $parts == *host* ]]; then
  timeout 30 python3 -m benchmarks.host_overhead --calls 100 2>&1 | grep -v Warn | tail -14
fi
if [[ $parts == *bench* ]]; then
  timeout 130 python3 -m tools.gpu_check --no-build --no-tests --ops window --out $OUT/gc --deadline 120 2>&1 | tail -4
  grep "^| window" $OUT/gc/*.md | head -20
fi
