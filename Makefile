# boxloss: two commands for a fresh machine.
#   make test   create .venv if needed, install the project with its test extra, run pytest
#   make demo   (arrives with the training issue)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch/torchvision pinned to the versions this machine serves; pyproject allows a range.
TORCH_PINS := "torch==2.14.1" "torchvision==0.29.1"

# torch's OpenMP threads spin-wait by default; on small machines (2 vCPUs) a second busy process
# (data-loader workers, multi-process tests) makes every op crawl. PASSIVE removes that cliff.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: venv test test-slow clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(TORCH_PINS)
	$(PY) -m pip install -e ".[test]"
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q

test-slow: venv
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) build *.egg-info
