# Two commands do all set-up on a fresh machine:
#   make train   create .venv, install CPU torch + lm, train the default CPU experiment
#   make test    create .venv, install CPU torch + lm + pytest, run the test suite (2 processes: PYTEST_JOBS)
#   make smoke   the `make train` path on a step budget, then every lm verb on its checkpoint (32-true, bf16-mixed)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
CONFIG ?= experiments/wikitext2_cpu.yaml
PYTEST_ARGS ?=

.PHONY: venv train smoke test test-fast clean-venv chromium

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The CPU torch wheel first: an unpinned torch would pull a multi-GB CUDA build.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	# LitData (data.loader: litdata) without its torchvision requirement, which would replace the CPU torch.
	$(BIN)/pip install --quiet --no-deps "litdata>=0.2.50"
	$(BIN)/pip install --quiet boto3 obstore filelock requests lightning-utilities
	touch $@

venv: $(VENV)/.installed

# WikiText-2's train split can't be fetched offline: where ../shared/data has only valid/test (this
# machine, CI), `make train` adds the offline-protocol overlay (train on valid, test on test).
WIKITEXT_DIR ?= ../shared/data/wikitext-2-raw-v1
ifeq ($(wildcard $(WIKITEXT_DIR)/wiki.valid.raw),)
DATA_CONFIG ?=
else
DATA_CONFIG ?= --config experiments/data/wikitext2_offline.yaml
endif
EXPERIMENT ?= $(basename $(notdir $(CONFIG)))

# Train, then report test loss / perplexity / bits-per-byte of the best checkpoint. TRAIN_ARGS reach both
# verbs, e.g. `make train TRAIN_ARGS="--trainer.precision 32-true" EXPERIMENT=wikitext2_cpu_fp32`.
TRAIN_ARGS ?=
train: venv
	$(BIN)/lm fit --config $(CONFIG) $(DATA_CONFIG) --experiment $(EXPERIMENT) $(TRAIN_ARGS)
	best=$$(ls -t checkpoints/$(EXPERIMENT)/step*.ckpt 2>/dev/null | head -n 1); \
	$(BIN)/lm test --config $(CONFIG) $(DATA_CONFIG) $(TRAIN_ARGS) --experiment $(EXPERIMENT)-test \
		--ckpt_path "$${best:-checkpoints/$(EXPERIMENT)/last.ckpt}"

# The `make train` path (same CONFIG and DATA_CONFIG: lm fit, then lm test of the best checkpoint) on a step
# budget, then every other verb on that checkpoint, once per precision (tests/smoke.py; outputs in
# checkpoints/smoke-<precision>*/ and logs/smoke-<precision>*/, removed when a run starts), the precisions side by
# side. One precision: `make smoke PRECISION=32-true`; one after the other: `make smoke SMOKE_ARGS="--jobs 1"`.
PRECISION ?= 32-true bf16-mixed
SMOKE_ARGS ?=
smoke: venv
	$(BIN)/python tests/smoke.py --precision $(PRECISION) --config $(CONFIG) $(DATA_CONFIG) $(SMOKE_ARGS)

# Debian's chromium for the playground's browser test (tests/test_serve.py), installed only if missing.
# Playwright drives it; `playwright install` (a browser download) is never used.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo -n); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null \
		|| echo "chromium could not be installed: the browser test will skip" >&2; }

# The whole suite, as CI runs it (`make test-fast` leaves out the few tests marked slow), in PYTEST_JOBS processes
# (pytest-xdist; a test file stays in one process, so its module fixtures are built once; PYTEST_JOBS=0: one process).
PYTEST_JOBS ?= 2
test: venv
	$(BIN)/python -m pytest -n $(PYTEST_JOBS) --dist loadfile $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/python -m pytest -n $(PYTEST_JOBS) --dist loadfile -m "not slow" $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
