# `make test` and `make demo` do all the set-up: create or reuse .venv, install
# the pinned dependencies, build the extension in place, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Written after a complete install; a venv without it is rebuilt.
STAMP := $(VENV)/.bn_ext-requirements
export MAX_JOBS ?= 2
# pytest runs in this many worker processes (pytest-xdist), with waiting
# OpenMP threads sleeping rather than spinning: two workers' spinning threads
# took each other's cores (the kernel tests ran 1.3x slower than one worker;
# with passive waiting, 0.7x). Tests marked `processes` (several
# torch.distributed ranks) run after the others, alone: the torchrun example
# aborted once at exit beside a second worker.
PYTEST_WORKERS ?= 2
PYTEST_PARALLEL := OMP_WAIT_POLICY=passive $(PY) -m pytest -n $(PYTEST_WORKERS)

.PHONY: all venv build test check demo bench gpu-check gpu-wheels mutants check-aarch64 clean

all: build

$(STAMP): requirements.txt
	@if [ ! -x $(PY) ] || ! $(PY) -c "import sys" >/dev/null 2>&1; then \
		rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); fi
	$(PY) -m pip install -q -r requirements.txt
	cp requirements.txt $(STAMP)

venv: $(STAMP)

# Built in place, and installed into the venv as an editable package once, so
# .venv/bin/python imports this checkout's bn_ext from any folder (the
# editable install reuses the in-place build's objects). setup.py builds the
# operators with CMake in build/cmake, the tree tests/cpp/run.sh installs.
build: $(STAMP)
	$(PY) setup.py -q build_ext --inplace
	@(cd / && $(abspath $(PY)) -c "import bn_ext, sys; sys.exit(bn_ext.__file__ != '$(CURDIR)/bn_ext/__init__.py')" 2>/dev/null) \
		|| $(PY) -m pip install -q --no-build-isolation --no-deps -e .

# The CPU kernel tests, repeated at every lower SIMD level this CPU runs (the
# whole suite runs at the best one). Tests marked level_independent (argument
# checks, module state, conversion) run once.
CPU_KERNEL_TESTS := tests/test_op_samples.py tests/test_batch_norm.py tests/test_batch_norm_act.py tests/test_group_norm.py tests/test_layer_norm.py tests/test_rms_norm.py tests/test_edge_cases.py

# The Python suite, the CPU kernel tests at the lower levels, then the C++
# package and its consumer tests (ctest).
test: build
	$(PYTEST_PARALLEL) -q -ra -m "not processes"
	$(PY) -m pytest -q -ra -m processes
	@for level in $$($(PY) -c "import bn_ext; print(*bn_ext.cpu_capabilities()[:-1])"); do \
		echo "CPU kernel tests at $$level:"; \
		BN_EXT_CPU_CAPABILITY=$$level $(PYTEST_PARALLEL) -q -p no:cacheprovider -m "not level_independent" $(CPU_KERNEL_TESTS) || exit 1; \
	done
	PY=$(PY) bash tests/cpp/run.sh

# For iteration: one CPU level (the best), and of each parametrized test the
# fewest cases that still hold every parameter value once (tests/conftest.py).
check: build
	$(PYTEST_PARALLEL) -q -p no:cacheprovider --quick -m "not processes"
	$(PY) -m pytest -q -p no:cacheprovider --quick -m processes

demo: build
	$(PY) -m bn_ext demo

bench: build
	$(PY) -m bn_ext bench

# The GPU's checks in one command (tests/gpu_check.py): the build for the GPU
# at hand, the CUDA tests and the CUDA bench, summarised in
# $(GPU_CHECK_DIR)/gpu-check.json. GPU_PYTHON runs it with a Python that
# already has torch (a GPU machine without network), skipping the venv.
GPU_CHECK_DIR ?= gpu_check_results
gpu-check: $(if $(GPU_PYTHON),,$(STAMP))
	$(or $(GPU_PYTHON),$(PY)) tests/gpu_check.py --output $(GPU_CHECK_DIR)

# The CMake wheel for a GPU machine without network or CMake: carried there
# with the tree, gpu_check.py installs it when its Python has no cmake.
gpu-wheels: $(STAMP)
	$(PY) -m pip download -q --no-deps -d gpu_check_wheels cmake==$$(sed -n 's/^cmake==//p' requirements.txt)

# Planted faults the tests must catch (tests/mutants.py); not part of `make
# test`: it rebuilds a private copy of the tree once per fault. FAMILY=name
# runs one family's (batch_norm, row_norm, group_norm, cuda, fold).
mutants: $(STAMP)
	$(PY) tests/mutants.py $(if $(FAMILY),--family $(FAMILY))

# Every CPU source compiled for aarch64 with Debian's cross compiler (not run).
check-aarch64: $(STAMP)
	command -v aarch64-linux-gnu-g++ >/dev/null || (apt-get update -qq && apt-get install -y -qq g++-aarch64-linux-gnu)
	PY=$(PY) bash tests/cross_compile_aarch64.sh

clean:
	rm -rf build bn_ext/*.so
