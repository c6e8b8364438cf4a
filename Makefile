# dcp_native: make venv | make test | make bench
#
# `make venv` is idempotent and quick once .venv exists. Where the python3 on
# PATH already imports torch (GPU machines), that torch is reused; otherwise the
# CPU build torch==2.13.0 is installed (pinned: an open range pulls a multi-GB
# CUDA build).

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.dcp_native-installed
TORCH_PIN := torch==2.13.0
BUILD_TOOLS := setuptools wheel pybind11 cmake ninja
# numpy: torch.distributed's object collectives (DCP's plan exchange between ranks)
# call tensor.numpy(), though torch does not depend on numpy.
TEST_TOOLS := pytest hypothesis zstandard numpy
# The real CUDA runtime library (2.5 MB, no GPU needed) for the `real_cudart` tests; without
# network they skip and say why.
CUDART_WHEEL := nvidia-cuda-runtime>=13,<14
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: venv build test bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py
	@set -e; \
	if [ ! -x $(VPY) ]; then \
	  if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
	    echo "reusing the torch of $$(command -v $(PYTHON))"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	    if ! $(VPY) -c "import torch" >/dev/null 2>&1; then \
	      $(PYTHON) -c "import sysconfig; p = sysconfig.get_paths(); print(p['purelib']); print(p['platlib'])" \
	        > "$$($(VPY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_dcp_native_host_site.pth"; \
	    fi; \
	  else \
	    $(PYTHON) -m venv $(VENV); \
	  fi; \
	fi; \
	$(VPY) -c "import torch" >/dev/null 2>&1 || $(VPY) -m pip install -q $(TORCH_PIN); \
	$(VPY) -c "import torch; print('torch', torch.__version__)"; \
	for mod in $(BUILD_TOOLS) $(TEST_TOOLS); do \
	  $(VPY) -c "import $$mod" >/dev/null 2>&1 || missing="$$missing $$mod"; \
	done; \
	if [ -n "$$missing" ]; then $(VPY) -m pip install -q $$missing; fi; \
	$(VPY) -c "import importlib.metadata as m; m.distribution('nvidia-cuda-runtime')" >/dev/null 2>&1 || \
	  $(VPY) -m pip install -q "$(CUDART_WHEEL)" || \
	  echo "could not install $(CUDART_WHEEL): the real_cudart tests will skip"; \
	$(VPY) -m pip install -q --no-build-isolation --no-deps -e . ; \
	touch $(STAMP)

# Incremental rebuild of the extension (ninja: a no-op when nothing changed).
build: $(STAMP)
	@$(VPY) setup.py -q build_ext --inplace

test: build
	$(VPY) -m pytest $(PYTEST_ARGS)

# matplotlib draws benchmarks/results/latest.png (the [bench] extra); installed into the
# venv when missing. Offline, the run goes on and only the chart is skipped.
BENCH_TOOLS := matplotlib

bench: build
	@missing=""; \
	for mod in $(BENCH_TOOLS); do \
	  $(VPY) -c "import $$mod" >/dev/null 2>&1 || missing="$$missing $$mod"; \
	done; \
	if [ -n "$$missing" ]; then \
	  $(VPY) -m pip install -q $$missing || echo "could not install$$missing: latest.png will not be drawn"; \
	fi
	$(VPY) benchmarks/run.py $(BENCH_ARGS)

clean:
	rm -rf build dcp_native/_C*.so dcp_native/_testing_fake_cudart.so *.egg-info
