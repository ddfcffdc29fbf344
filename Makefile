# vitkernels: `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
PIP    := $(VPY) -m pip

# CUDA kernels are built when nvcc is found (CUDA_HOME set, or /usr/local/cuda); without it, C++ CPU only.
ifeq ($(origin CUDA_HOME), undefined)
  ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
    export CUDA_HOME := /usr/local/cuda
  endif
endif
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
export MAX_JOBS ?= 2

DEPS := torch==2.14.1 torchvision==0.29.1 timm==1.0.31 pytest pytest-benchmark ninja pybind11 matplotlib "setuptools>=77" \
        onnx onnxruntime onnxscript scikit-learn tqdm
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu)

# The lent GPU machines run triton 3.6: make test-slow also compiles every kernel ahead of time with it
# (installed beside the venv, never imported by the venv itself).
TRITON_SIDE_VERSION ?= 3.6.0
TRITON_SIDE := $(VENV)/triton-$(TRITON_SIDE_VERSION)

.PHONY: install test test-slow demo train-demo bench bench-pytest gpu-check clean

install: $(VENV)/.installed

$(VENV)/.deps:
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(DEPS)
	touch $@

# --no-build-isolation: an isolated build would fetch another multi-GB torch just to compile csrc/.
$(VENV)/.installed: $(VENV)/.deps $(SOURCES)
	$(PIP) install -q --no-build-isolation -e .
	touch $@

$(TRITON_SIDE)/.installed:
	$(PIP) install -q --no-deps --target $(TRITON_SIDE) triton==$(TRITON_SIDE_VERSION)
	touch $@

# CPU suite with Triton interpreted; on a machine with a CUDA device, then the gpu/triton tests compiled
# (tools/testplan.py: two pytest processes, since TRITON_INTERPRET is read once per process).
test: install
	VITKERNELS_REQUIRE_EXT=1 $(VPY) -m tools.testplan

test-slow: install $(TRITON_SIDE)/.installed
	VITKERNELS_REQUIRE_EXT=1 VITKERNELS_AOT_TRITON_PATH=$(abspath $(TRITON_SIDE)) $(VPY) -m tools.testplan --slow

# GPU validation in one command on any CUDA machine, with the Python that holds torch (no venv, no
# downloads): builds vitkernels._C for the local GPU, runs the gpu tests compiled, times the benchmark
# subset against the peers, writes benchmarks/results/<date>-<gpu>.{json,md}. ARGS=--quick | --dry-run.
gpu-check:
	$(PYTHON) -m tools.gpu_check $(ARGS)

demo: install
	$(VPY) -m vitkernels

# A ViT trained from scratch on the CPU on scikit-learn's bundled digits (nothing downloaded): about 40 s on
# 2 cores, to ~97% val accuracy (chance: 10%). Checkpoints and summary.json in build/train-demo.
TRAIN_DEMO_ARGS ?= --model vit_tiny_patch16_224 --img-size 16 --model-kwargs patch_size=4 depth=4 --epochs 15 \
                   --batch-size 64 --device cpu --output build/train-demo
train-demo: install $(VENV)/.train-deps
	$(VPY) -m vitkernels.train $(TRAIN_DEMO_ARGS)

# vitkernels.train's extras (in DEPS too; this brings them to a venv made before they were)
$(VENV)/.train-deps: $(VENV)/.deps
	$(PIP) install -q scikit-learn tqdm
	touch $@

# Op- and model-level tables against the peers (GPU: full sweeps; CPU: a small subset), saved under
# benchmarks/results/ with plots.
bench: install
	$(VPY) -m vitkernels.bench attention --save --plot benchmarks/results/attention.png
	$(VPY) -m vitkernels.bench attention --bias --mode fwd+bwd --limit 4 --save
	$(VPY) -m vitkernels.bench window --save --plot benchmarks/results/window.png
	$(VPY) -m vitkernels.bench patch --save
	$(VPY) -m vitkernels.bench model --save

bench-pytest: install
	$(VPY) -m pytest benchmarks -q --benchmark-columns=median,iqr,rounds

clean:
	rm -rf build *.egg-info vitkernels/*.so $(VENV)/.installed
