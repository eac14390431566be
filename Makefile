# The two commands a newcomer runs: `make demo` and `make test`. Both set up .venv when missing.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all lint docs docs-serve format bench constraints clean

$(VENV): $(STAMP)

# constraints.txt pins the tested versions of the direct dependencies (make constraints).
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]' -c constraints.txt
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/cdcl demo --out demo_out

# pytest-xdist: one worker per core (TEST_WORKERS=0 runs serially); --dist loadfile keeps a
# file's tests on one worker, so its module-scoped fixtures (a trained run, a built screen)
# are built once. The ten slowest tests are listed at the end. `make test` leaves out the
# end-to-end tests marked `slow` (about 7 minutes on 2 cores); `make test-all` (what CI runs)
# runs every test.
TEST_WORKERS ?= auto
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=10
test: $(STAMP) lint docs
	$(PYTEST) -m "not slow"

test-all: $(STAMP) lint docs
	$(PYTEST)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks tools
	$(BIN)/ruff format --check src tests benchmarks tools

# The documentation site, built with --strict: a broken link or anchor fails the build.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir site

docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks tools
	$(BIN)/ruff check --fix src tests benchmarks tools

bench: $(STAMP)
	for f in benchmarks/bench_*.py; do $(BIN)/python $$f || exit 1; done

constraints: $(STAMP)
	$(BIN)/python tools/write_constraints.py

clean:
	rm -rf $(VENV) demo_out site .pytest_cache .ruff_cache
