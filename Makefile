# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY := .venv/bin/python

.PHONY: install demo test lint bench clean

install:
	@bash scripts/install.sh

demo: install
	$(PY) -m sparseapps demo --out runs/demo

test: install
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check sparseapps tests scripts

bench: install
	$(PY) scripts/bench_core.py

clean:
	rm -rf .venv runs .pytest_cache .ruff_cache .install.log
