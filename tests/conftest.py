"""Test-session setup: offline hub, Triton interpreter on CPU, two threads (the CI machine has 2 cores)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any kernel definition
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
# transformers 5.25 kernelizes every from_pretrained model with kernels fetched from the Hub unless this is off;
# the references the tests compare against are the plain torch layers, and a test never downloads.
os.environ.setdefault("USE_HUB_KERNELS", "0")

import torch  # noqa: E402

torch.set_num_threads(2)
