# boxloss: two commands for a fresh machine.
#   make test   create .venv if needed, install the project with its test extra, run pytest
#   make demo   generate the shapes data, train RetinaNet-R18 with the CIoU loss on the CPU, evaluate, plot
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch/torchvision pinned to the versions this machine serves; pyproject allows a range.
TORCH_PINS := "torch==2.14.1" "torchvision==0.29.1"

# torch's OpenMP threads spin-wait by default; on small machines (2 vCPUs) a second busy process
# (data-loader workers, multi-process tests) makes every op crawl. PASSIVE removes that cliff.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: venv test test-slow demo clean

# setup.py and the C sources too: they build the compiled loss kernels (boxloss/_native.c)
$(VENV)/.installed: pyproject.toml setup.py boxloss/_native.c boxloss/_native_kernel.h boxloss/_nms_native.c boxloss/_nms_native_kernel.h
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

DEMO_DIR := work_dirs/demo_retinanet_r18_shapes_ciou
demo: venv
	$(PY) tools/make_shapes.py --out data/shapes --if-missing
	rm -rf $(DEMO_DIR)
	$(PY) tools/train.py configs/retinanet_r18_shapes.py --box-loss ciou --work-dir $(DEMO_DIR)
	$(PY) tools/plot_curves.py $(DEMO_DIR)
	@echo "checkpoints, logs and curves.png are in $(DEMO_DIR)"

clean:
	rm -rf $(VENV) build *.egg-info

# On a machine with one CUDA GPU: build, CUDA tests, benchmarks, simulation, training-step timings,
# one report (work_dirs/gpu_check/report.md) in <= 8 minutes. Installs nothing and needs no network:
# the Python of .venv when there is one, else $(PYTHON) with its own torch (>= 2.6).
.PHONY: gpu-check
gpu-check:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) tools/gpu_check.py
