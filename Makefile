# The two commands a newcomer runs (see README.md): `make demo` and `make test`.
# Both create .venv/ when it is missing and install the dependencies once, at the exact versions of
# constraints.txt (setup.py only states the supported ranges); stamp files make a second run install nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mokd-installed
# DeepSpeed JIT-compiles its C++ communication op once per machine (~3 min); keep it in the checkout.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
WARM := $(TORCH_EXTENSIONS_DIR)/.mokd-warm
export MPLBACKEND ?= Agg
# The venv's tools first, so the warm-up compiles with the same ninja as every later process.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo test test-unit fashion-mnist clean-venv

setup: $(STAMP) $(WARM)

$(STAMP): setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,demo]'
	touch $(STAMP)

$(WARM): $(STAMP)
	@echo "Compiling DeepSpeed's C++ ops once (about 3 minutes on 2 cores; cached in $(TORCH_EXTENSIONS_DIR))"
	$(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	mkdir -p $(TORCH_EXTENSIONS_DIR) && touch $(WARM)

# The demo's images: Fashion-MNIST from Debian's package (no download at run time).
fashion-mnist:
	@dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || \
		($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist)

demo: setup fashion-mnist
	$(PY) -m mokd_scale.tools.demo

test: setup
	$(PY) -m pytest -q --durations=15 tests

# The fast unit tests only (no process started, no training run; pytest.ini's integration marker).
test-unit: setup
	$(PY) -m pytest -q -m "not integration" tests

clean-venv:
	rm -rf $(VENV)
