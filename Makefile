# Two set-up commands (see README): `make demo` and `make test`.
#
# torch is pinned to 2.13.0 (constraints.txt) and comes from your pip configuration: PyPI's build for
# your platform (on Linux x86-64 that is the CUDA build, several GB), or a wheel your pip finds
# locally. Choose the build without editing files:
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu     # CPU-only build (~200 MB)
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cu130   # CUDA 13.0 build
VENV ?= .venv
TORCH_INDEX ?=
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# Test workers (pytest-xdist): one per CPU, at most 4; `make test JOBS=0` runs the tests in this process.
JOBS ?= $(shell python3 -c 'import os; print(min(4, len(os.sched_getaffinity(0))))')

.PHONY: setup demo test
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) install -c constraints.txt torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -c constraints.txt -e '.[test]'
	touch $@

demo: setup
	$(VENV)/bin/hybridtrt demo

test: setup
	$(PY) -m pytest -q -n $(JOBS) --dist loadscope $(PYTEST_ARGS)
