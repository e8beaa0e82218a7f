# Two commands on a fresh machine: `make serve` (server on the embedded default) and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: serve test install lock

# The pinned pip first: the pip bundled with Python 3.11 (23.2) refuses a hash-pinned package that
# a dependency asks for with extras (pytest-cov -> coverage[toml]) once a newer release exists.
$(BIN)/.installed: requirements/bootstrap.txt requirements/main.txt requirements/dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --require-hashes --no-deps \
		-r requirements/bootstrap.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --require-hashes \
		-r requirements/main.txt -r requirements/dev.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

install: $(BIN)/.installed

serve: $(BIN)/.installed
	$(BIN)/strongroom serve

test: $(BIN)/.installed
	bash scripts/system-deps
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/test

# Re-pin dependencies (hashes, no index URLs recorded).
lock: $(BIN)/.installed
	$(BIN)/pip-compile -q --generate-hashes --no-emit-index-url --no-emit-find-links --allow-unsafe --strip-extras \
		-o requirements/main.txt requirements/main.in
	$(BIN)/pip-compile -q --generate-hashes --no-emit-index-url --no-emit-find-links --allow-unsafe --strip-extras \
		-o requirements/dev.txt requirements/dev.in
	$(BIN)/pip-compile -q --generate-hashes --no-emit-index-url --no-emit-find-links --allow-unsafe --strip-extras \
		-o requirements/bootstrap.txt requirements/bootstrap.in
