# The two commands of the README. Each creates .venv (once) with the pinned dependencies of
# constraints.txt and the project installed in editable mode, then runs its job.
VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)

.PHONY: check demo test

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# Main job: the conformance suite over every available backend, printing its table.
check: $(STAMP)
	$(VENV)/bin/attnspec info
	@echo
	$(VENV)/bin/attnspec check --backend all

# A worked example: continuity in the span, explain(), gradients.
demo: $(STAMP)
	$(VENV)/bin/attnspec demo

# The test suite (Hypothesis profile `ci` by default; HYPOTHESIS_PROFILE=thorough for more).
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q
