"""Shared fixtures live in tests/fixtures/*; registered here as plugins."""

import os

import torch

if not torch.cuda.is_available():
    # The Triton kernels of the CUDA path run under Triton's interpreter on a machine without a GPU
    # (tests/test_triton_kernels.py). Triton reads this when it is first imported, and transformers imports it
    # whenever it is installed, so it is set here, before any plugin or test module loads. The engine's "auto"
    # kernels stay on torch ops on a CPU whatever this says.
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest_plugins = ["tests.fixtures.models", "tests.fixtures.redis", "tests.fixtures.server"]
