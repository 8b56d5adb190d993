# Two entry points a newcomer needs (see README): `make run` serves, `make test` tests.
# Both create ./.venv on first use. torch is installed first and pinned to 2.13.0 so pip does not pull a
# different (multi-GB) build; the project itself only asks for a range.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
TORCH  ?= torch==2.13.0

.PHONY: run test venv bench clean

$(BIN)/bone-server: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

venv: $(BIN)/bone-server

run: venv
	$(BIN)/bone-server up

test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
