"""`make demo` (python -m vitkernels) stays a working job: it lists the backends and runs every op."""
import os
import re
import subprocess
import sys


def test_demo_prints_backends_and_every_op_with_its_error():
    env = dict(os.environ)
    env.pop("VITKERNELS_BACKEND", None)
    env.pop("TRITON_INTERPRET", None)  # as `make demo` runs it: interpreted triton at ViT sizes takes minutes
    result = subprocess.run([sys.executable, "-m", "vitkernels", "--small", "--reps", "1", "--device", "cpu"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for name in ("reference", "triton", "cuda", "cpu"):
        assert re.search(rf"^  {name}\s+(yes|no)\s+\S", text, re.M), text
    for op in ("flash_attention", "window_attention", "patch_embed"):
        row = re.search(rf"^{op}\s+reference\s+float32\s+([0-9.e+-]+)\s+([0-9.]+)\s+([0-9.]+)$", text, re.M)
        assert row, f"no reference row for {op}:\n{text}"
        assert float(row.group(1)) < 1e-4, row.group(0)  # fp32 vs the fp64 reference
