# gatewayd — the two commands a fresh machine needs:
#   make run    create .venv, install, start gatewayd on loopback with etc/gatewayd.yaml
#   make test   create .venv if needed, install, run the whole test suite
#               (installs promtool first when missing: see test-deps)

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test test-deps integration-deps check-config clean

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

# promtool runs the alert-rule unit tests. Debian ships it in the prometheus
# package; installed once, as root (or through sudo), quietly.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

test-deps:
	@command -v promtool >/dev/null 2>&1 || { \
	  echo "installing promtool (Debian package prometheus)"; \
	  $(SUDO) apt-get update -qq >/dev/null && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

# tests/integration runs real Postfix and Dovecot instances (on loopback ports, in
# temporary directories; the system services are never started). Postfix's debconf
# question is preseeded to "No configuration" so the install never prompts.
INTEGRATION_PACKAGES := postfix dovecot-lmtpd dovecot-imapd swaks libnet-ssleay-perl

integration-deps:
	@command -v postfix >/dev/null 2>&1 && command -v dovecot >/dev/null 2>&1 && command -v swaks >/dev/null 2>&1 || { \
	  echo "installing $(INTEGRATION_PACKAGES)"; \
	  echo "postfix postfix/main_mailer_type select No configuration" | $(SUDO) debconf-set-selections && \
	  $(SUDO) apt-get update -qq >/dev/null && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    $(INTEGRATION_PACKAGES) >/dev/null; }

test: $(STAMP) test-deps integration-deps
	$(PY) -m pytest

clean:
	rm -rf $(VENV) var .pytest_cache
