# alflow developer entry points. The README's two commands are `make example` and `make test`.
#
# CPU machines install torch==$(TORCH_VERSION) first (on a plain PyPI setup add
# TORCH_INDEX=https://download.pytorch.org/whl/cpu to avoid the multi-GB CUDA build);
# GPU machines: `make setup TORCH_SPEC=torch` (PyPI's default Linux build ships CUDA).

VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
TORCH_SPEC ?= torch==$(TORCH_VERSION)
TORCH_INDEX ?=
PYTEST_ARGS ?=

.PHONY: setup example test test-fast bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e ".[test,bench]"
	touch $@

setup: $(VENV)/.installed

example: setup
	$(VENV)/bin/alflow validate examples/cu_emt/config.yaml
	$(VENV)/bin/alflow run examples/cu_emt/config.yaml

test: setup
	bash scripts/install_test_codes.sh
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" -x -q $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/neighbors.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
