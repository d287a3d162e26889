# Two commands do everything on a fresh machine:
#   make demo   set up .venv, make synthetic shards, a preview grid and a report under runs/demo/
#   make test   set up .venv and run the test suite (without the tests marked slow)
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ldm-installed
# pip's configured local indexes print one harmless line per missing package: keep the log readable
PIPFILTER := grep -v -e "is ignored: it is neither a file nor a directory" || true

.PHONY: install browser demo test test-all test-slow test-slurm bench clean cluster-up cluster-down

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing ldm and its dependencies into $(VENV) (first time: a few minutes)"
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]' 2>&1 | $(PIPFILTER)
	@$(PY) -c "import ldm, torch, pytorch_lightning, webdataset, open_clip" \
		|| { echo "the install is incomplete: see the pip output above"; exit 1; }
	@touch $(STAMP)

demo: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-offline} $(PY) experiments/demo.py --out runs/demo

# the headless browser that tests/tools/test_runs_dashboard.py renders `ldm runs compare`'s dashboard.html in: as
# root, apt installs Debian's chromium where missing (~20 s here with its 130 dependencies); elsewhere those
# tests skip and say why
browser:
	@if ! command -v chromium >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing chromium with apt-get (headless browser for the dashboard test)" >&2; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 \
	    || { DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	         DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1; } \
	    || echo "apt-get could not install chromium: the dashboard browser tests will skip" >&2; \
	fi

test: $(STAMP) browser
	$(PY) -m pytest -m "not slow and not gpu and not slurm" --durations=15

test-all: $(STAMP) browser
	$(PY) -m pytest

# only the tests marked slow (long end-to-end fits, multi-process runs): CI runs them after make test
test-slow: $(STAMP) browser
	$(PY) -m pytest -m "slow and not gpu and not slurm" --durations=10

# ldm submit, preemption and requeue on a real one-node Slurm cluster started here (root; apt installs
# slurm-wlm and munge where missing), stopped afterwards
test-slurm: $(STAMP)
	slurm/local-cluster.sh up
	status=0; SLURM_CONF=$${LDM_SLURM_DIR:-/tmp/ldm-slurm}/slurm.conf $(PY) -m pytest -m slurm tests/slurm \
		|| status=$$?; slurm/local-cluster.sh down; exit $$status

bench: $(STAMP)
	$(PY) experiments/bench/data_loader.py
	$(PY) experiments/bench/unet.py
	$(PY) experiments/bench/metrics.py

# a one-node SLURM cluster on this machine (root): then export the SLURM_CONF line that `up` prints
cluster-up:
	slurm/local-cluster.sh up

cluster-down:
	slurm/local-cluster.sh down

clean:
	rm -rf runs/demo .pytest_cache
