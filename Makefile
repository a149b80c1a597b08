# maskbench: `make bench` and `make test` set up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATASET ?= synthetic
ARGS ?=

# torch/torchvision builds that install on this kind of machine without a multi-GB download;
# override TORCH_SPEC for a GPU machine, e.g. make bench TORCH_SPEC="torch torchvision".
ifeq ($(shell uname -m),aarch64)
TORCH_SPEC ?= torch==2.9.1 torchvision==0.24.1
else
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
endif

.PHONY: venv bench download test tables figures verify perf perf-threads paper-smoke sanity lint clean-venv

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH_SPEC) 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -c "import torch, torchvision" || { echo "torch/torchvision failed to install ($(TORCH_SPEC))"; exit 1; }
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -c "import maskbench.benchmark, captum, pycocotools, pandas, tqdm" || { echo "install of maskbench failed"; exit 1; }
	@touch $@

venv: $(VENV)/.installed

# NPROC=N: N processes under torchrun (one device each; gloo with one thread each on the CPU)
NPROC ?= 1
bench: venv
ifeq ($(NPROC),1)
	$(PY) -m maskbench.benchmark bench --dataset $(DATASET) $(ARGS)
else
	$(PY) -m torch.distributed.run --nproc_per_node $(NPROC) -m maskbench.benchmark bench --dataset $(DATASET) $(ARGS)
endif

# download: fetch, verify and extract VOC-2007 (DATASET=voc) or COCO-2014 (DATASET=coco) into the cache
download: venv
	$(PY) -m maskbench.benchmark download $(DATASET) $(ARGS)

test: venv
	$(PY) -m ruff check .
	$(PY) -m pytest -q $(ARGS)

tables: venv
	$(PY) -m maskbench.benchmark tables

# figures: redraw a run's figures (results/<dataset>/<model>/figures/) and the results pages (index.html) from its
# stored tables and cached masks (RUN=results/synthetic-grid/grid-smallcnn for another run); `bench` does it at its end
figures: venv
	$(PY) -m maskbench.benchmark figures --run $(or $(RUN),results/$(DATASET)/smallcnn) $(ARGS)

# verify: recompute the published default run from an empty cache in a scratch folder, compare every table cell
verify: venv
	$(PY) -m maskbench.benchmark verify $(ARGS)

# perf: our implementations vs the reference ones (optional `compare` extra: pytorch-grad-cam, TorchRay),
# side by side in one run; writes results/perf/methods.csv and scaling.csv.
perf: venv
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[compare]" 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -m maskbench.benchmark perf $(ARGS)

# perf-threads: the default run's slice with 1 and 2 threads, alone and beside a busy process (threads.csv)
perf-threads: venv
	$(PY) -m maskbench.benchmark perf-threads $(ARGS)

# paper-smoke: VOC/COCO/ImageNet trees written here, fetched through the download code from a loopback server,
# every method at its paper preset (capped) on the three published settings; its numbers mean nothing
paper-smoke: venv
	$(PY) -m maskbench.benchmark paper-smoke --out build/paper-smoke $(ARGS)

# sanity: the checks that do not fit the default run (after `make bench`, reusing its masks): ROAD, model and data
# randomisation with the learned methods retrained, class leakage through the removal masks, and the
# guaranteed-ground-truth grid run
sanity: venv
	$(PY) -m maskbench.benchmark bench --dataset $(DATASET) --extra-metrics road $(ARGS)
	$(PY) -m maskbench.benchmark sanity --dataset $(DATASET) $(ARGS)
	$(PY) -m maskbench.benchmark leakage --dataset $(DATASET) $(ARGS)
	$(PY) -m maskbench.benchmark bench --dataset synthetic-grid $(ARGS)

lint: venv
	$(PY) -m ruff check .

clean-venv:
	rm -rf $(VENV)
