# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO ?= demo_run

.PHONY: setup test demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

test: setup
	$(PY) -m pytest -q tests

demo: setup
	$(PY) -m refer.demo_data --out $(DEMO)/data --images 300 --seed 0 --overwrite
	$(PY) -m bert.build_small --refer_data_root $(DEMO)/data --dataset rrsisd --out $(DEMO)/bert --overwrite
	@echo "demo: data and small BERT are ready under $(DEMO)/ (training stages land in a later issue)"

clean:
	rm -rf $(VENV) $(DEMO)
