# The two commands a newcomer runs (see README.md): `make demo` and `make test`.
# Both create .venv/ when it is missing and install the pinned dependencies once;
# the stamp file makes a second run install nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mokd-installed
# DeepSpeed JIT-compiles its C++ ops once per machine (~3 min); keep them in the checkout.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export MPLBACKEND ?= Agg

.PHONY: setup demo test bench clean-venv

setup: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test,demo]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) tools/demo.py

test: $(STAMP)
	$(PY) -m pytest -q tests

clean-venv:
	rm -rf $(VENV)
