# Developer entry points. CI runs scripts/test (through .ci/run); these are shortcuts.
#
#   make test          every check and test (scripts/test; extra pytest args: ARGS=...)
#   make fuzz          nightly-style fuzz run: 1,000,000 inputs over the envelope parser,
#                      the ingest pipeline and the HTTP routes (FUZZ_INPUTS=... to change)
#   make fuzz-ci       the bounded CI variant (20,000 inputs, < 2 minutes)
#   make soak          the soak tests at full size (200,000 messages; SOAK_MESSAGES=...)
#   make bench-scale   benchmarks/scale.py (workers x back ends, 1,000,000 devices)

PY ?= .venv/bin/python
PYTEST ?= .venv/bin/pytest
FUZZ_INPUTS ?= 1000000
FUZZ_CHUNK ?= 50000
SOAK_MESSAGES ?= 200000
ARGS ?=

.PHONY: test fuzz fuzz-ci soak bench-scale

test:
	scripts/test $(ARGS)

# In chunks of FUZZ_CHUNK inputs, each with its own seed, a line of progress per chunk; the
# first failing chunk stops the run (its seed reproduces it: SENSORSEAL_FUZZ_SEED=N).
fuzz:
	@done=0; chunk=0; \
	while [ $$done -lt $(FUZZ_INPUTS) ]; do \
		chunk=$$((chunk + 1)); \
		echo "fuzz chunk $$chunk (seed $$chunk): inputs $$done..$$((done + $(FUZZ_CHUNK))) of $(FUZZ_INPUTS)"; \
		SENSORSEAL_FUZZ_SEED=$$chunk SENSORSEAL_FUZZ_INPUTS=$(FUZZ_CHUNK) $(PYTEST) -q \
			-p no:cacheprovider -s -o timeout=0 tests/fuzz || exit 1; \
		done=$$((done + $(FUZZ_CHUNK))); \
	done; echo "fuzz: $$done inputs in $$chunk chunks, no failure"

fuzz-ci:
	$(PYTEST) -q -p no:cacheprovider -s tests/fuzz

soak:
	SENSORSEAL_SOAK_MESSAGES=$(SOAK_MESSAGES) $(PYTEST) -q -p no:cacheprovider -s \
		-o timeout=0 tests/e2e/test_soak.py

bench-scale:
	$(PY) benchmarks/scale.py
