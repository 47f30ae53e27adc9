# The whole set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: install demo test test-fast typecheck bench notebooks clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,providers]'
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

demo: install
	$(PY) -m frugalflow.cli demo

test: install
	$(PY) -m pytest -q

# The edit-test loop: everything except the tests marked `slow` (3 minutes or less).
test-fast: install
	$(PY) -m pytest -q -m "not slow"

# mypy --strict on frugalflow/ (settings in pyproject.toml [tool.mypy]).
typecheck: install
	$(PY) -m mypy

# Re-execute the example notebooks in place, so the committed copies carry their outputs
# (plots included); `make notebooks NB=02_routing_and_costs.ipynb` re-executes one.
notebooks: install
	$(PY) examples/execute.py $(NB)

bench: install
	$(PY) bench/overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache
