"""distributed.broadcast_flag sends its tensor on the process group's device: NCCL moves CUDA
tensors only (a CPU tensor fails there), gloo CPU ones. The collective itself is stubbed (nothing
in the trainer calls broadcast_flag yet, so no multi-process test runs it)."""

from __future__ import annotations

import pytest
import torch

from t2i.train import distributed

WORLD = distributed.World(rank=1, world_size=2)


@pytest.fixture
def sent(monkeypatch):
    """The tensors handed to dist.broadcast; the stub plays rank 0 having sent True."""
    tensors = []

    def broadcast(tensor, src):
        assert src == 0
        tensors.append((tensor.device, tensor.dtype))
        tensor.fill_(1)

    monkeypatch.setattr(distributed.dist, "broadcast", broadcast)
    return tensors


def test_gloo_flag_travels_on_the_cpu(monkeypatch, sent):
    monkeypatch.setattr(distributed.dist, "get_backend", lambda group=None: "gloo")
    assert distributed.broadcast_flag(WORLD, False) is True
    assert sent == [(torch.device("cpu"), torch.int32)]


def test_nccl_flag_travels_on_this_ranks_cuda_device(monkeypatch, sent):
    monkeypatch.setattr(distributed.dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    made = []
    real_tensor = torch.tensor

    def tensor(data, *, dtype=None, device=None):  # no CUDA here: record, then build on the CPU
        made.append(torch.device(device))
        return real_tensor(data, dtype=dtype)

    monkeypatch.setattr(torch, "tensor", tensor)
    assert distributed.broadcast_flag(WORLD, False) is True
    assert made == [torch.device("cuda", 3)]


def test_single_process_returns_the_flag_without_a_collective(sent):
    assert distributed.broadcast_flag(distributed.World(), True) is True and not sent
