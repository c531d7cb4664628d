# The two commands a new user runs: `make demo` (train the main job) and `make test`.
# Both set up .venv first (idempotent: reinstalls only when pyproject.toml changes).

VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "torch==2.13.0"
	$(PYTHON) -m pip install -e ".[test,plots]"
	touch $(STAMP)

test: setup
	$(PYTHON) -m pytest -q

demo: setup
	$(VENV)/bin/accelerate launch --num_processes 1 scripts/train.py --config configs/tiny-cpu.yaml

bench: setup
	$(PYTHON) scripts/bench_step.py --impl both --out bench_results/step.json --plot

clean:
	rm -rf $(VENV) runs bench_results .pytest_cache
