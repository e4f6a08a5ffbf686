# The two commands of the README: `make demo` and `make test`. Both install what is missing
# (Debian packages as root, then a virtual environment with the project in it) and are safe to
# run again. `make check` is the static half of `make test`.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTHON ?= $(shell command -v python3.11 || command -v python3)
DEMO_DIR ?= .demo
PYTEST_ARGS ?=
MOSQUITTO_MIN := 2.0.18

# binary -> Debian package that provides it
SYSTEM_DEPS := /usr/sbin/mosquitto:mosquitto /usr/bin/influxd:influxdb /usr/sbin/upsd:nut-server /lib/nut/dummy-ups:nut-server /usr/bin/chromium:chromium /usr/share/fonts/truetype/wqy/wqy-microhei.ttc:fonts-wqy-microhei

.PHONY: help system-deps broker venv setup check test test-unit test-component test-integration bench demo clean

help:
	@echo "make demo    install what is missing, then run the stack, the fleet server and kiosks"
	@echo "make test    install what is missing, then make check and the whole test suite"
	@echo "make check   ruff format + lint, mypy --strict, import-linter contracts"
	@echo "make test-unit | test-component | test-integration   one tier of the suite"
	@echo "make bench   the benchmarks under bench/"

system-deps:
	@missing=""; \
	for pair in $(SYSTEM_DEPS); do \
	  bin=$${pair%%:*}; pkg=$${pair##*:}; \
	  [ -e "$$bin" ] || missing="$$missing $$pkg"; \
	done; \
	$(PYTHON) -c "import ensurepip, venv" 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "missing Debian packages:$$missing (run as root, or apt-get install them)"; exit 1; fi; \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@$(MAKE) --no-print-directory broker

# Mosquitto before 2.0.18 aborts now and then ("free(): invalid pointer") when it saves its
# persistence file while offline MQTT 5 sessions hold queued messages; Debian 12 ships 2.0.11.
# On Debian 12 the fixed broker comes from bookworm-backports (Debian's own, signed build).
broker:
	@have=$$(dpkg-query -W -f='$${Version}' mosquitto 2>/dev/null || true); \
	if dpkg --compare-versions "$${have:-0}" ge $(MOSQUITTO_MIN); then exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then echo "Mosquitto $${have:-(none)} is older than $(MOSQUITTO_MIN) (run as root, or install it from bookworm-backports)"; exit 1; fi; \
	. /etc/os-release; \
	if [ "$${VERSION_CODENAME:-}" = bookworm ]; then \
	  printf '%s\n' 'Types: deb' 'URIs: http://deb.debian.org/debian' 'Suites: bookworm-backports' \
	    'Components: main' 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' \
	    > /etc/apt/sources.list.d/bookworm-backports.sources; \
	  target="-t bookworm-backports"; \
	else target=""; fi; \
	echo "installing Mosquitto >= $(MOSQUITTO_MIN) (have $${have:-none})"; \
	apt-get update -qq; \
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$target mosquitto; \
	have=$$(dpkg-query -W -f='$${Version}' mosquitto); \
	dpkg --compare-versions "$$have" ge $(MOSQUITTO_MIN) || { echo "Mosquitto $$have installed, $(MOSQUITTO_MIN) needed"; exit 1; }

$(STAMP): pyproject.toml
	@[ -x "$(PY)" ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

setup: system-deps venv

check: venv
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: setup check
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-unit: venv
	$(VENV)/bin/pytest tests/unit $(PYTEST_ARGS)

test-component: venv
	$(VENV)/bin/pytest tests/component $(PYTEST_ARGS)

test-integration: setup
	$(VENV)/bin/pytest tests/integration $(PYTEST_ARGS)

# The ingest benchmark's baseline is Mosquitto's own C clients, matching the broker's version.
bench: setup
	@[ -x /usr/bin/mosquitto_sub ] || { . /etc/os-release; \
	  target=""; [ "$${VERSION_CODENAME:-}" = bookworm ] && target="-t bookworm-backports"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$target mosquitto-clients; }
	@for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b; done

demo: setup
	$(VENV)/bin/fleetctl demo --workdir $(DEMO_DIR)

clean:
	rm -rf $(VENV) $(DEMO_DIR) .mypy_cache .ruff_cache .pytest_cache .hypothesis *.egg-info
