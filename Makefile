# Two commands set everything up on a fresh machine:
#   make run    the service on the embedded default: the small checkpoint on the CPU, at http://127.0.0.1:8000
#   make test   the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test install clean guidellm

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: anything that pulls torch later must find it already installed.
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# GuideLLM (bench/live_sla.py's load tool) in its own environment: it brings its own torch and transformers.
GUIDELLM := .cache/guidellm-venv/bin/guidellm
$(GUIDELLM):
	$(PYTHON) -m venv .cache/guidellm-venv
	.cache/guidellm-venv/bin/pip install --quiet guidellm==0.8.1

guidellm: $(GUIDELLM)

run: $(STAMP)
	RAY_AUTH_MODE=disabled $(BIN)/supernet-router serve --host $(HOST) --port $(PORT)

test: $(STAMP)
	# The metrics tests run a real Prometheus (Debian package); without root they skip with a reason.
	command -v prometheus >/dev/null || { test "$$(id -u)" = 0 && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus; } || echo "prometheus not installed: tests/e2e/test_metrics.py skips its Prometheus tests"
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .cache .pytest_cache
