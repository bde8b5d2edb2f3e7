# Two entry points: `make demo` (tiny pipeline on CPU) and `make test`.
# Both create .venv on first use and install the pinned dependencies from constraints.txt.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,launch,tracking]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/evolm pipeline

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder tests

clean:
	rm -rf runs .pytest_cache
