# Two commands on a fresh machine: `make quickstart` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# torch/torchvision pinned: these wheels install from local disk on the CI machines (CPU).
TORCH   := torch==2.14.1 torchvision==0.29.1
STORAGE ?= runs

.PHONY: quickstart figures test lint docs bench clean

$(BIN)/raysweep: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH) -e '.[dev]'
	touch $@

quickstart: $(BIN)/raysweep
	$(BIN)/raysweep run search_spaces/quickstart.yaml --storage $(STORAGE)

# README's figures: the quickstart's report (table and PNGs) into docs/figures/, committed.
figures: quickstart
	$(BIN)/raysweep report $(STORAGE)/quickstart --out docs/figures

# The tests (tests/test_docs.py fails on a stale docs/reference/ page), then the site as a user
# gets it: --strict turns every broken link, anchor or API reference into a failure.
test: $(BIN)/raysweep
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/pytest -q
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir site

lint: $(BIN)/raysweep
	$(BIN)/ruff check raysweep tests bench docs
	$(BIN)/ruff format --check raysweep tests bench docs
	$(BIN)/lint-imports

# The documentation site into site/ (ignored): reference pages regenerated from the code first.
docs: $(BIN)/raysweep
	$(BIN)/python docs/gen_reference.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

bench: $(BIN)/raysweep
	$(BIN)/python -m bench

clean:
	rm -rf $(STORAGE) .pytest_cache
