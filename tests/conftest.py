"""Shared pytest setup: CPU only, one thread, deterministic algorithms; the trained micro runs
that many tests read (trained once per session). Plain helpers live in helpers.py."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# The commands under test set torch's thread count from OMP_NUM_THREADS (t2i.cli.common.
# set_threads): the same count everywhere, whatever the machine's cores. One thread: the tensors
# here are tiny, and on a shared 2-core machine a second OpenMP thread that spin-waits for a busy
# core made model-heavy tests up to 8x slower (7.5 s -> 59 s for 1000 UNet calls).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import micro_cfg, micro_f8_cfg, run_stage  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"].split(",")[0]))


# Session runs: read them, never write into them; a test that changes a run takes the `_copy`
# fixture (its own copy under tmp_path).


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory) -> Path:
    """Both stages of the MICRO config: vae.safetensors, VAE and UNet checkpoints at steps 2
    and 4, metrics.jsonl with 4 + 4 records."""
    out = tmp_path_factory.mktemp("micro") / "run"
    assert run_stage(micro_cfg(), out) == 0
    return out


@pytest.fixture
def micro_run_copy(micro_run, tmp_path) -> Path:
    """A copy of micro_run at tmp_path / "run", free to change."""
    return Path(shutil.copytree(micro_run, tmp_path / "run"))


@pytest.fixture(scope="session")
def f8_run(tmp_path_factory) -> Path:
    """Both stages of the MICRO_F8 config (32x32 images, f8 VAE): the UNet checkpoint of step 3
    and the training sample grid written at step 3 (samples/unet-0000003.png)."""
    out = tmp_path_factory.mktemp("micro-f8") / "run"
    assert run_stage(micro_f8_cfg(), out) == 0
    return out


@pytest.fixture
def keep_threads():
    """For tests that run commands which set torch's thread count (set_threads): give the rest
    of the suite its own back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
