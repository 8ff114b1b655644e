# Everything a person runs. `make demo` and `make test` work on a fresh machine with only
# Python 3.11 or later, gcc and make (durable-rules compiles its C core on install, on 3.11
# and 3.12; on 3.13+ it does not build and the reference evaluator runs instead).
#
# PYTHON picks the interpreter (default: the first of 3.12, 3.11, 3.13, python3 that runs);
# each minor version gets its own virtualenv, so `make test PYTHON=python3.13` never reuses
# a 3.11 one: .venv for 3.11 and 3.12, .venv-3.13 (and so on) for the others.

PYTHON ?= $(shell for p in python3.12 python3.11 python3.13 python3; do \
	if command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(not (3,11) <= sys.version_info[:2])' 2>/dev/null; then command -v $$p; break; fi; done)
PYVER := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
VENV ?= $(if $(filter 3.11 3.12,$(PYVER)),.venv,.venv-$(PYVER))
BIN := $(VENV)/bin
LIFECYCLE := $(BIN)/lifecycle
DEMO_DB := sqlite:///demo.db

.PHONY: demo run test test-fast crash-test chaos bench bench-rules-diff bench-lifecycle soak experiment lint clean venv browser readme

$(BIN)/python:
	@test -n "$(PYVER)" || { echo "Python 3.11 or later is required (PYTHON=$(PYTHON) does not run)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@

venv: $(VENV)/.installed

demo: venv
	@rm -rf demo.db demo.db-wal demo.db-shm demo-simulated.db demo-simulated.db-wal demo-simulated.db-shm outbox
	@echo "== 1. checking the rules"
	$(LIFECYCLE) rules check
	@echo "== 2. seeding 2,000 synthetic customers into demo.db"
	LIFECYCLE_DATABASE_URL=$(DEMO_DB) $(LIFECYCLE) seed --customers 2000 --now 2026-03-02T09:00:00Z
	@echo "== 3. evaluating every customer against every playbook (durable_rules; the reference evaluator on Python 3.13+)"
	LIFECYCLE_DATABASE_URL=$(DEMO_DB) $(LIFECYCLE) evaluate --now 2026-03-02T09:00:00Z
	@echo "== 4. thirty simulated days of journeys on a fake clock, on a copy of demo.db (console channel, files in outbox/)"
	LIFECYCLE_DATABASE_URL=$(DEMO_DB) COLUMNS=120 $(LIFECYCLE) simulate --days 30 --start 2026-03-02T09:00:00Z --customer seed-00000001 --activity synthetic --work-db demo-simulated.db --outbox outbox
	@echo "Explore it: export LIFECYCLE_DATABASE_URL=sqlite:///demo-simulated.db; $(LIFECYCLE) explain seed-00000001"

run: venv
	$(LIFECYCLE) init
	$(LIFECYCLE) run

# Debian's chromium for the browser tests (never Playwright's own browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
		else echo "install Debian's chromium (apt-get install chromium) for the browser tests"; fi; }

test: venv browser
	$(BIN)/python -m pytest -q

test-fast: venv
	$(BIN)/python -m pytest -q -m "not postgres and not browser and not slow"

# The crash test of exactly once at ten random kill points per database (a few minutes;
# `make test` runs one per database): prints what the provider received at each.
crash-test: venv
	@mkdir -p bench-results && rm -f bench-results/crash.jsonl
	LIFECYCLE_CRASH_KILL_POINTS=10 LIFECYCLE_CRASH_REPORT=bench-results/crash.jsonl \
		$(BIN)/python -m pytest -q tests/integration/test_dispatch_crash.py
	$(BIN)/python -m tests.support.crash_report bench-results/crash.jsonl

# The distributed runner's chaos run (PostgreSQL + RabbitMQ, two workers, SIGKILLs, a
# scheduler taken over): 100,000 customers by default, many minutes; prints its counts.
chaos: venv
	$(BIN)/python -m bench.chaos --customers $(or $(SIZE),100000)

# make bench                        the full run (1,000,000 customers: many minutes)
# make bench CUSTOMERS=100000        a quick one; DATABASES=sqlite to leave PostgreSQL out
# (also: BENCH_DISTRIBUTED=100000 a full sweep inline vs two Dramatiq workers, BENCH_LATENCY_S=60
#  event-to-queued-message at 100 events/s through the API; 0 skips either)
CUSTOMERS ?= 1000000
DATABASES ?= sqlite,postgres
bench: venv
	BENCH_CUSTOMERS=$(CUSTOMERS) BENCH_DATABASES=$(DATABASES) $(BIN)/python -m bench

# `lifecycle rules diff` on 100,000 seeded customers with a changed threshold, timed
# (make bench-rules-diff CUSTOMERS=1000000 DATABASES=sqlite,postgres for more).
bench-rules-diff: venv
	BENCH_CUSTOMERS=$(if $(filter command line,$(origin CUSTOMERS)),$(CUSTOMERS),100000) BENCH_DATABASES=$(if $(filter command line,$(origin DATABASES)),$(DATABASES),sqlite) $(BIN)/python -m bench.rules_diff

# What stages cost the sweep (with and without rules/stages.yaml), and `lifecycle report
# lifecycle --json` after 30 simulated days, checked against plain SQL (many minutes).
# make bench-lifecycle CUSTOMERS=100000 ROUNDS=2
bench-lifecycle: venv
	BENCH_LIFECYCLE_CUSTOMERS=$(or $(filter-out 1000000,$(CUSTOMERS)),100000) BENCH_LIFECYCLE_ROUNDS=$(or $(ROUNDS),1) $(BIN)/python -m bench.lifecycle_report

# Ten million evaluations through durable_rules in worker processes (a few minutes).
soak: venv
	BENCH_CUSTOMERS=0 BENCH_EVAL_SIZES=0 BENCH_DISPATCH=0 BENCH_RENDER=0 BENCH_INGEST=0 BENCH_SOAK=10000000 $(BIN)/python -m bench

# make experiment                   does the report's 95% uplift interval hold a known truth?
# make experiment SEEDS=40 SIZE=3000 (customers per run)
experiment: venv
	EXPERIMENT_SEEDS=$(or $(SEEDS),20) EXPERIMENT_CUSTOMERS=$(or $(SIZE),3000) $(BIN)/python -m bench.experiment

lint: venv
	$(BIN)/ruff check engine channels scheduler.py tests bench docs
	$(BIN)/mypy engine channels scheduler.py docs

# The README's generated parts: the settings table (engine/settings.py) and the HTTP API
# examples (docs/api_examples.json); tests/e2e/test_readme.py fails when they are stale.
readme: venv
	$(BIN)/python -m docs.readme

clean:
	rm -rf .venv .venv-3.* demo.db* demo-simulated.db* outbox bench-results .pytest_cache .hypothesis
