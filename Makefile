# Two entry points on a fresh machine: `make demo` (the CPU demo) and `make test` (everything CI runs).
# Both create .venv on first use from the lock: the exact versions the suite last passed on, the CPU
# build of torch pinned (an unpinned torch pulls CUDA). `make upgrade-deps` moves the lock forward.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LOCK := launcher/constraints-cpu.txt
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(LOCK) | cksum | cut -d' ' -f1)
PIP_VERSION := 26.3
# The lock is resolved for this Python and platform; the CPU torch wheel comes from a local folder
# where the machine has one (pip.conf's find-links), else from PyPI (then its CUDA packages appear in the lock
# and pip, which never installs them for the CPU wheel, ignores those lines).
TORCH_WHEELS ?= /opt/wheels
LOCK_FLAGS := --extra cpu --extra deepspeed --extra qlora --extra dev --python-version 3.11 \
  --python-platform x86_64-unknown-linux-gnu --custom-compile-command "make lock" --quiet \
  $(if $(wildcard $(TORCH_WHEELS)),--find-links $(TORCH_WHEELS))

export LAUNCHER_CACHE_DIR ?= $(CURDIR)/.cache/launcher
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export MPLBACKEND ?= Agg

.PHONY: demo test lint venv slurm-packages clean lock upgrade-deps

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "pip==$(PIP_VERSION)"
	$(PY) -m pip install -q -c $(LOCK) "torch==2.13.0" -e ".[cpu,deepspeed,qlora,dev]"
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

# Re-resolve the lock after a change to pyproject.toml, keeping every pin that still fits.
lock: $(STAMP)
	$(VENV)/bin/uv pip compile pyproject.toml $(LOCK_FLAGS) -o $(LOCK)

# The newest releases pyproject.toml's ranges admit: written to the lock, .venv rebuilt from it, and the
# whole suite run on them. Commit the new lock only if `make test` passed; otherwise hold the package
# that broke back (a `<` bound in pyproject.toml, with the reason) and run it again. tests/bench/RESULTS.md
# records each run ("Dependency upgrades").
upgrade-deps: $(STAMP)
	$(VENV)/bin/uv pip compile pyproject.toml $(LOCK_FLAGS) --upgrade -o $(LOCK)
	rm -rf $(VENV)
	$(MAKE) test

clean:
	rm -rf $(VENV) .cache runs .pytest_cache .mypy_cache .ruff_cache
