"""Shared pytest setup: CPU only, few threads, deterministic algorithms."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# The commands under test set torch's thread count from OMP_NUM_THREADS (t2i.cli.common.
# set_threads): the same count everywhere, whatever the machine's cores.
os.environ.setdefault("OMP_NUM_THREADS", str(max(1, min(2, os.cpu_count() or 1))))

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"].split(",")[0]))
