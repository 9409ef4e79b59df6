# Two entry points for a fresh Debian machine (Python 3.11):
#   make run    install the node and start it on its embedded defaults
#   make test   install everything the tests need (DCMTK, dicom3tools, Orthanc, PostgreSQL, systemd,
#               Chromium, poppler, OpenJPH) and run the whole suite
# VENV may point at an existing virtual environment; REQUIRE_PEERS=1 turns "peer missing" into a failure.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SUDO := $(shell [ "$$(id -u)" = "0" ] || echo sudo)
APT_RUN := python3-venv python3-pip
# TrueType fonts for names in scripts the bundled DejaVu subset lacks (CJK; Hangul; Arabic, Hebrew, Thai,
# Devanagari and other Noto scripts), in reports and PDFs
APT_FONTS := fonts-droid-fallback fonts-wqy-microhei fonts-noto-core fonts-dejavu-core
APT_TEST := dcmtk dicom3tools orthanc postgresql chromium poppler-utils openjph-tools systemd
PYTEST_ARGS ?=
ifeq ($(REQUIRE_PEERS),1)
PYTEST_ARGS += --require-peers
endif

.PHONY: run test system-run system-test install install-test lint typecheck

run: install
	$(VENV)/bin/cxr-node serve $(if $(CONFIG),--config $(CONFIG),)

test: system-test install-test
	$(PY) -m pytest $(PYTEST_ARGS)

# Debian's python3 has the venv module without ensurepip (that is python3-venv), and venv needs both.
system-run:
	@$(PYTHON) -c 'import ensurepip, venv' >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_RUN); }
	@missing=""; for p in $(APT_FONTS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  { $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; } || \
	  echo "warning: fonts not installed ($$missing): Chinese, Japanese and Korean names print as boxes in PDFs"; \
	fi

system-test: system-run
	@missing=""; for p in $(APT_TEST); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(PY): | system-run
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Installed once per pyproject.toml (the install is editable: code changes need none): a restart with
# `make run` then needs no package index, as at a site without one.
install: $(VENV)/.installed-run
install-test: $(VENV)/.installed-test

$(VENV)/.installed-run: pyproject.toml | $(PY)
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PIP) install -q -e '.[test]'
	touch $@

lint: install-test
	$(VENV)/bin/ruff check dicom_node classifier reporting tests benchmarks

typecheck: install-test
	$(VENV)/bin/mypy
