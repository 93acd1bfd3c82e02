# Two commands: `make dev` runs a local cluster, `make test` runs the suite.
# Both create .venv on first use (Python 3.11+ as $(PYTHON)).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: dev test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "meshpush needs Python 3.11+"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[local,test]'
	touch $(STAMP)

dev: $(STAMP)
	$(BIN)/meshpush dev $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check meshpush chaos tests bench deploy
	$(BIN)/ruff format --check meshpush chaos tests bench deploy
	$(BIN)/mypy meshpush

bench: $(STAMP)
	$(BIN)/meshpush bench fanout
	$(BIN)/meshpush bench idle-memory
	$(BIN)/meshpush bench connect
	$(BIN)/meshpush bench failover

clean:
	rm -rf $(VENV) .meshpush .pytest_cache .mypy_cache .ruff_cache
