# gatewayd — the two commands a fresh machine needs:
#   make run    create .venv, install, start gatewayd on loopback with etc/gatewayd.yaml
#   make test   create .venv if needed, install, run the whole test suite

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test check-config clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

run: $(STAMP)
	mkdir -p var
	$(VENV)/bin/gatewayd run -c etc/gatewayd.yaml

check-config: $(STAMP)
	$(VENV)/bin/gatewayd check-config -c etc/gatewayd.yaml

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) var .pytest_cache
