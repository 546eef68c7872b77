# Set-up and everyday commands. Everything runs from the project's own virtual environment (.venv),
# created and installed on first use: `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: venv demo test test-slow test-all protos bench-quick clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[server,test]'
	touch $(STAMP)

venv: $(STAMP)

## The whole system on the embedded default (SQLite, both services on loopback), in data/demo.
demo: $(STAMP)
	$(VENV)/bin/copl demo --workdir data/demo

## The test suite (slow end-to-end cases excluded; `make test-all` runs them too).
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

test-all: $(STAMP)
	$(PY) -m pytest -q

## Regenerate the gRPC/protobuf stubs beside protos/copl/v1/*.proto.
protos: $(STAMP)
	$(PY) protos/run_codegen.py

bench-quick: $(STAMP)
	for b in bench/*.py; do $(PY) $$b --quick || exit 1; done

clean:
	rm -rf $(VENV) data/demo .pytest_cache
