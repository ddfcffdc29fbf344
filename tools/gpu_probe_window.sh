# Window attention on a lent GPU: compiled-Triton tests, per-stage timings and kernel breakdown, host cost
# per call, and the gpu-check window cases against timm / Flex (from the repository root:
# bash tools/gpu_probe_window.sh; results under $OUT)
export PYTHONPATH=. VITKERNELS_CACHE_DIR=$OUT/cache TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu --format=csv,noheader
timeout 150 python3 -m pytest -q -rfE -n 8 -p no:cacheprovider -m "gpu or triton" tests/ops/test_window_attention_triton.py tests/ops/test_tuning.py -k "window or Window" > $OUT/tests.log 2>&1; echo "pytest rc=$?"; tail -8 $OUT/tests.log
timeout 90 python3 -m benchmarks.window_kernels --json $OUT/window_kernels.json 2>&1 | grep -v Warn | tail -40
timeout 30 python3 -m benchmarks.host_overhead --calls 100 2>&1 | grep -v Warn | tail -8
timeout 130 python3 -m tools.gpu_check --no-build --no-tests --ops window --out $OUT/gc --deadline 120 2>&1 | tail -4
grep "^| window" $OUT/gc/*.md | head -20
