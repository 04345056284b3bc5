# The two entry points the README names: `make demo` (main job) and `make test`.
# Both start from nothing: they create .venv at the repository root and install what is missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.colgrid-installed
DATA_DIR ?= data
PORT ?= 50051

.PHONY: demo serve test install protos clean

install: $(STAMP)

$(STAMP): pyproject.toml client/pyproject.toml Makefile
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	# torch and torchvision are taken from this machine's disk when present (see README).
	$(VENV)/bin/python -m pip install torch==2.14.1 torchvision==0.29.1
	$(VENV)/bin/python -m pip install -e ./client -e '.[export,dev]'
	# ColPali/ColQwen2 model code for export; its torch<2.14 pin is too strict (works on 2.14.1).
	$(VENV)/bin/python -m pip install --no-deps colpali-engine==0.3.18
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/colgrid demo --data-dir $(DATA_DIR) --port $(PORT)

serve: $(STAMP)
	$(VENV)/bin/colgrid serve --data-dir $(DATA_DIR) --port $(PORT)

test: $(STAMP)
	# A real PostgreSQL server for the registry tests (installed with apt when missing and root).
	-bash scripts/postgres.sh install
	$(VENV)/bin/python protos/generate.py --check
	$(VENV)/bin/python -m pytest; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

protos: $(STAMP)
	$(VENV)/bin/python protos/generate.py

clean:
	rm -rf $(VENV) $(DATA_DIR)
