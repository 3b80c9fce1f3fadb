# The two commands (see README.md):
#   make demo   the main job on the built-in data (installs what it needs first)
#   make test   builds both extensions and runs the Python and C++ tests and the static GPU check (what CI runs)
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# torch looks under /usr/local for the toolkit when CUDA_HOME is unset, and then fails to link.
export CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
export MAX_JOBS ?= 2
# Where nvcc exists, sparrow._C must build and its tests must run rather than skip.
NVCC := $(if $(CUDA_HOME),$(wildcard $(CUDA_HOME)/bin/nvcc),)
BUILD_ENV := $(if $(NVCC),SPARROW_CUDA=1 SPARROW_REQUIRE_EXTENSIONS=1,)
CMAKE_BUILD := build/cmake-sanitize

.PHONY: install test test-python test-cpp static-check demo bench clean

install:
	$(PIP) install --quiet "torch>=2.4" triton numpy pybind11 ninja "setuptools>=64" wheel
	$(BUILD_ENV) $(PIP) install --quiet --no-build-isolation -e ".[test]"

test: install test-cpp test-python static-check

test-python:
	$(BUILD_ENV) $(PYTHON) -c "import sparrow, sparrow._bpe$(if $(NVCC),$(comma) sparrow._C,); print(sparrow.ops.available_backends())"
	$(BUILD_ENV) $(PYTHON) -m pytest -q tests

# Every kernel compiled for sm_80 and sm_90 without a GPU: fails on a spill, shared memory over the limit, an
# unpipelined attention loop or attention dots off the tensor cores (README "Static GPU check"). Cached by source
# hash under build/static-cache; a cold run takes a few minutes on 2 cores.
static-check:
	$(PYTHON) -m benchmarks.static_check --workers $(MAX_JOBS) --no-write

test-cpp:
	cmake -S . -B $(CMAKE_BUILD) -DSPARROW_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug > /dev/null
	cmake --build $(CMAKE_BUILD) -j $(MAX_JOBS)
	ctest --test-dir $(CMAKE_BUILD) --output-on-failure

demo: install
	$(PYTHON) -m sparrow demo

bench: install
	$(PYTHON) -m benchmarks

clean:
	rm -rf build $(CMAKE_BUILD) sparrow/*.so *.egg-info

comma := ,
