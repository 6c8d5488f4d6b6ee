# `make demo` and `make test` do all set-up on a fresh machine: they create .venv (Python 3.11) when it is
# missing, broken or older than the requirements, install the pinned dependencies, then run.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The image's network is closed: stop libraries phoning home for update checks at import time.
export NO_ALBUMENTATIONS_UPDATE := 1
export WANDB_MODE := disabled

.PHONY: install demo demo-vit demo-imagegpt test test-fast clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt requirements-nodeps.txt
	@if ! $(PY) -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null; then \
		echo "creating $(VENV) with $(PYTHON)"; rm -rf $(VENV); $(PYTHON) -m venv $(VENV); fi
	$(PY) -m pip install -q --upgrade pip==26.3
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	@touch $(STAMP)

demo: install
	PY=$(PY) bash scripts/demo.sh

demo-vit: install
	PY=$(PY) bash scripts/demo_vit.sh

demo-imagegpt: install
	PY=$(PY) bash scripts/demo_imagegpt.sh

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m 'not slow'

clean:
	rm -rf runs demo
