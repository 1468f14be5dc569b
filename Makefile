# Two commands set everything up on a fresh machine:
#   make run    the service on the embedded default (today: a generation on the small checkpoint, on the CPU)
#   make test   the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEFAULT_CHECKPOINT := .cache/checkpoints/tiny

.PHONY: run test install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: anything that pulls torch later must find it already installed.
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	test -f $(DEFAULT_CHECKPOINT)/config.json || $(BIN)/supernet-router checkpoint tiny --out $(DEFAULT_CHECKPOINT)
	$(BIN)/supernet-router generate --checkpoint $(DEFAULT_CHECKPOINT) --placement AASGKG \
		--prompt "def fibonacci(n):" --max-tokens 32

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .cache .pytest_cache
