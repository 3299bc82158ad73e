# Two commands set everything up: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= test,triton,megatron,transformers,verl,report
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast demo lint clean

venv: $(STAMP)

# torch goes in first and alone: with 2.13.0 (the local CPU wheel) present, nothing later can
# pull a CUDA build through a looser requirement.
$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

# three workers on two cores, one test file each at a time, in collection order (conftest puts the Ray cluster
# tests first): module fixtures are built once per file, and while one worker mostly waits for Ray and verl to
# start, the other two keep both cores busy with the converter tests
test: venv
	$(PY) -m pytest -q -n 3 --dist loadfile --no-loadscope-reorder

test-fast: venv
	$(PY) -m pytest -q -n 3 --dist loadfile --no-loadscope-reorder -m "not slow and not network"

demo: venv
	$(VENV)/bin/launch demo --out demo-out

lint: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) demo-out .pytest_cache build *.egg-info
