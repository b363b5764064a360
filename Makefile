# Two entry points on a fresh machine: `make demo` (the CPU demo) and `make test` (everything CI runs).
# Both create .venv on first use with the CPU build of torch pinned (an unpinned torch pulls CUDA).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

export LAUNCHER_CACHE_DIR ?= $(CURDIR)/.cache/launcher
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export MPLBACKEND ?= Agg

.PHONY: demo test lint venv slurm-packages clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0" -e ".[cpu,deepspeed,qlora,dev]"
	rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/launcher run recipes/tiny-cpu.yaml

# The SLURM tests need Debian's slurm-wlm and munge; install them where we are root and they are missing.
slurm-packages:
	@if ! command -v slurmctld >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing SLURM (slurmctld slurmd slurm-client munge) for the SLURM tests"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      slurmctld slurmd slurm-client munge >/dev/null; \
	  else echo "note: SLURM is not installed and cannot be (not root / no apt): the SLURM tests will skip"; fi; \
	fi

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: $(STAMP) slurm-packages lint
	$(PY) -m pytest

clean:
	rm -rf $(VENV) .cache runs .pytest_cache .mypy_cache .ruff_cache
