# The two commands of the README: `make generate` and `make test`. Each sets itself up in .venv,
# installing only what it needs, in two layers that either command can lay first:
#   .venv/.generate  npllama and what NumPy generation needs (pip install -e .)
#   .venv/.test      + torch and the test tools (pip install -e '.[torch,test]')
# and fetches the default model into weights/ once.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PROMPT  ?= What is the capital of France?
ARGS    ?=
PYTEST_ARGS ?=
# torch for `make test`. 2.13.0 is the release whose CPU build the development machines and CI
# have on disk. From PyPI on Linux, torch is the CUDA build (several GB with its nvidia-*
# packages); on a machine without a GPU take the CPU build from PyTorch's own index:
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH   ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: setup generate test bench clean

$(VENV)/.generate: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.generate
	$(PY) -m pip install -q '$(TORCH)' $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e '.[torch,test]'
	touch $@

setup: $(VENV)/.generate
	$(PY) -m npllama fetch

generate: setup
	$(VENV)/bin/npllama generate --prompt "$(PROMPT)" $(ARGS)

test: setup $(VENV)/.test
	OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 -q $(PYTEST_ARGS)

bench: setup $(VENV)/.test
	$(PY) bench/bench_cpu.py

clean:
	rm -rf $(VENV) build *.egg-info
