# The two set-up commands: `make demo` and `make test`. Everything they need is installed here.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RPE := $(VENV)/bin/rpe
TORCH := torch==2.13.0
MODEL := smollm2-135m-instruct
DEMO_DIR := runs/demo
DEMO_BUDGET ?= small
PYTEST_ARGS ?=

.PHONY: demo test install fetch bench clean browser docs

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[train,test]" $(TORCH)
	touch $@

install: $(VENV)/.installed

fetch: install
	$(RPE) models fetch $(MODEL)

# The paper's protocol at the small budget (about 10 minutes on 2 cores): rollouts with a layer sweep, fit with
# every control, ablation, dopamine, search, then the report. Re-running continues an interrupted demo.
demo: fetch
	$(RPE) reproduce --model $(MODEL) --task chain_sum_mix --budget $(DEMO_BUDGET) --out $(DEMO_DIR)
	@echo "Open $(abspath $(DEMO_DIR)/report/report.html) in a browser."

# pytest exits 5 when it collects no test: say so and fail, a silent pass would hide a broken suite.
# Headless Chromium checks the HTML report in a real browser; installed here when apt-get can. Where apt-get can
# install as root the browser test is required (a failed install fails it); elsewhere it skips.
# RPE_REQUIRE_TRL: a broken TRL install fails the TRL tests instead of skipping them.
CAN_APT := $(shell [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && echo 1)

browser:
	@command -v chromium >/dev/null 2>&1 || { [ -n "$(CAN_APT)" ] && \
	  { apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }; } && \
	  echo "installed chromium"; } || echo "no chromium: the browser test will skip (or fail where apt-get could install it)"

# The documentation site (MkDocs + Material + mkdocstrings) into site/; --strict: a warning (broken link, missing
# page, undocumented parameter type, a reference that does not resolve) fails the build, and so `make test`.
$(VENV)/.docs-installed: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[docs]" $(TORCH)
	touch $@

docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet
	@echo "Open $(abspath site/index.html) in a browser (or: $(VENV)/bin/mkdocs serve)."

test: fetch browser docs
	RPE_REQUIRE_REAL_MODEL=1 RPE_REQUIRE_TRL=1 RPE_REQUIRE_BROWSER=$(CAN_APT) $(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

bench: fetch
	$(RPE) bench rollouts

clean:
	rm -rf $(VENV) runs site .docs_src *.egg-info
