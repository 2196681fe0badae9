# Two commands set everything up on a fresh machine:  `make train`  and  `make test`.
# Everything they need is installed here; nothing is assumed to be on the machine beyond
# python3 (3.9+), a C++ compiler and, optionally, a CUDA toolkit (nvcc) for the CUDA build.

PYTHON   ?= python3
VENV     := .venv
PY       := $(VENV)/bin/python
PIP      := $(PY) -m pip
STAMP    := $(VENV)/.installed

# torch 2.14.1 is the CUDA 13.0 build: it lets csrc/ compile and link as a CUDAExtension
# even on machines without a GPU (see README "Installation").
TORCH_PKGS := torch==2.14.1 torchvision==0.29.1

# A CUDA toolkit for the native build: the system one if present, else none (CPU-only build).
CUDA_HOME ?= $(firstword $(wildcard /usr/local/cuda-13.0 /usr/local/cuda))
export CUDA_HOME
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
export MAX_JOBS ?= 2
export DS_BUILD_OPS ?= 0
export HF_HUB_OFFLINE ?= 1
# DeepSpeed passes its CPU shared-memory op (deepspeed_shm_comm) through torch's JIT build at
# every run start (ninja: a no-op when nothing changed). In the shared ~/.cache/torch_extensions
# the build file names the venv's source paths, so a run of another checkout (other venv)
# relinks the same .so in place while this one loads it. Each environment keeps its own cache.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions
export TRANSFORMERS_OFFLINE ?= 1

EXT_SRCS := $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h csrc/*.cuh)
EXT_STAMP := $(VENV)/.ext-built

.PHONY: env ext test train bench clean distclean

env: $(STAMP) $(EXT_STAMP)

$(STAMP): setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	$(PIP) install $(TORCH_PKGS)
	GROUPVIT_FAST_NO_EXT=1 $(PIP) install --no-build-isolation -e ".[train,dev]"
	touch $@

# The native extension (csrc/) is rebuilt in place whenever its sources change.
$(EXT_STAMP): $(STAMP) $(EXT_SRCS) setup.py
	$(PY) setup.py -q build_ext --inplace
	touch $@

ext: $(EXT_STAMP)

# The pytest script, not `python -m pytest`: -m puts the repository root on sys.path, where the
# source folder kernels/ shadows the `kernels` package that transformers (>= 5.x) requires and
# imports (ImportError: cannot import name 'CUDAProperties' from 'kernels').
test: env
	$(VENV)/bin/pytest -q tests

# The main job on the embedded default: DeepSpeed training on the synthetic dataset (one CPU
# rank here, every GPU on a GPU machine), then zero-shot segmentation of its held-out split
# beside the baselines and a random-init model (table + output/default/emergence.png).
# The job takes the whole machine: every core as intra-op threads of the single CPU rank
# (measured on 2 cores: 165 img/s with 2 threads vs 115 with 1). The trainer's own default is one
# thread per rank below 4 cores, because OpenMP barriers collapse when another job shares the
# cores; export OMP_NUM_THREADS=1 to keep that when the machine is shared.
TRAIN_OUT ?= output/default
TRAIN_THREADS ?= $(shell nproc)

train: env
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$(TRAIN_THREADS)} \
	  $(VENV)/bin/deepspeed train/main.py --set checkpoint.output_dir=$(TRAIN_OUT)
	$(PY) -m groupvit_fast.seg.emergence --checkpoint $(TRAIN_OUT)

bench: env
	$(PY) bench/grouping.py

clean:
	rm -rf build groupvit_fast/_C*.so $(EXT_STAMP) .pytest_cache

distclean: clean
	rm -rf $(VENV)
