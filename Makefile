# The two commands of the README: `make generate` and `make test`. Each sets itself up:
# a virtual environment in .venv, the package with its extras, and the default model in weights/.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PROMPT  ?= What is the capital of France?
ARGS    ?=
PYTEST_ARGS ?=

.PHONY: setup generate test bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch's CPU build (an unpinned torch would pull a multi-GB CUDA build)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[torch,test]'
	touch $@

setup: $(VENV)/.installed
	$(PY) -m npllama.cli fetch

generate: setup
	$(VENV)/bin/npllama generate --prompt "$(PROMPT)" $(ARGS)

test: setup
	OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 -q $(PYTEST_ARGS)

bench: setup
	$(PY) bench/bench_cpu.py

clean:
	rm -rf $(VENV) build *.egg-info
