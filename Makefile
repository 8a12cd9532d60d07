# The two set-up commands of the README. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= demo-out

.PHONY: demo test test-fast lint bench clean

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/activate
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(VENV)/bin/activate
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/privenc demo --out $(DEMO_OUT)

# Everything (what CI runs): the lint, then the whole suite.
test: lint
	$(PY) -m pytest -q

# The edit loop: the suite without the tests marked slow (torchrun, kills, the demo).
test-fast: $(VENV)/.installed-test
	$(PY) -m pytest -q -m "not slow"

lint: $(VENV)/.installed-test
	$(PY) -m ruff check .

bench: $(VENV)/.installed
	$(PY) benchmarks/run.py

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
