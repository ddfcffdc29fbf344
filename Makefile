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

DEPS := torch==2.14.1 torchvision==0.29.1 timm==1.0.31 pytest pytest-benchmark ninja pybind11 matplotlib
SOURCES := setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cuda/*.cu)

.PHONY: install test test-slow demo bench bench-pytest clean

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

test: install
	VITKERNELS_REQUIRE_EXT=1 TRITON_INTERPRET=1 $(VPY) -m pytest -q -m "not slow" tests

test-slow: install
	VITKERNELS_REQUIRE_EXT=1 TRITON_INTERPRET=1 $(VPY) -m pytest -q -m slow tests

demo: install
	$(VPY) -m vitkernels

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
