"""Multi-process training on CPU: torchrun with 2 gloo processes equals one process with the
doubled batch; the shapes set splits the global batch between ranks; only rank 0 writes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from t2i.config import DataConfig
from t2i.data import build_loader
from t2i.models.text import tokenize
from helpers import MICRO, micro_cfg, run_stage

DDP_SETTINGS = ["train.stage=all", "train.vae_steps=2", "train.unet_steps=2",
                "train.save_every=1", "train.keep_last=0", "train.batch_size=4",
                "train.grad_accum=2"]  # 2 micro-batches: the first under DDP no_sync


def test_shapes_ranks_split_the_global_batch():
    cfg = DataConfig(source="shapes", resolution=16)
    whole = next(iter(build_loader(cfg, batch_size=4, tokenize=tokenize, seed=7)))
    parts = [next(iter(build_loader(cfg, batch_size=2, tokenize=tokenize, seed=7, rank=r,
                                    world_size=2))) for r in range(2)]
    assert torch.equal(torch.cat([p["image"] for p in parts]), whole["image"])
    assert parts[0]["prompt"] + parts[1]["prompt"] == whole["prompt"]
    assert parts[0]["key"] + parts[1]["key"] == whole["key"]  # disjoint rows, globally named


def torchrun(out: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    sets = [arg for item in overrides for arg in ("--set", item)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "t2i.cli.train", "--preset", "tiny", *sets, "--out", str(out), "--device", "cpu",
           "--log-every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def one_and_two_processes(tmp_path, settings: list[str]):
    """(single-process run folder, 2-rank gloo run folder, the torchrun process)."""
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert run_stage(micro_cfg(*settings), single) == 0
    proc = torchrun(multi, MICRO + settings)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return single, multi, proc


def assert_same_weights(single, multi, files: list[tuple[str, ...]]) -> None:
    for parts in files:
        a, b = load_file(str(single.joinpath(*parts))), load_file(str(multi.joinpath(*parts)))
        assert a.keys() == b.keys()
        for k in a:  # gradients averaged by all-reduce vs one pass: rounding only
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"{parts} {k}")


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_with_doubled_batch(tmp_path):
    single, multi, proc = one_and_two_processes(tmp_path, DDP_SETTINGS)
    assert proc.stdout.count("done: ") == 1  # rank 0 alone reports
    assert_same_weights(single, multi, [("vae.safetensors",),
                                        ("vae", "ckpt-0000002", "ema.safetensors"),
                                        ("unet", "ckpt-0000002", "model.safetensors"),
                                        ("unet", "ckpt-0000002", "ema.safetensors")])
    logs = [p.joinpath("metrics.jsonl").read_text().splitlines() for p in (single, multi)]
    assert len(logs[0]) == len(logs[1]) == 4  # one writer: no duplicated lines from rank 1
    import json
    for one, two in zip(*logs):  # the logged loss is the mean over both ranks' rows
        assert json.loads(one)["loss"] == pytest.approx(json.loads(two)["loss"], rel=1e-4)
        # and the data counts are both ranks' (rank 0 alone would report half the samples)
        assert json.loads(one)["bad_samples"] == json.loads(two)["bad_samples"]
    trainer = torch.load(multi / "unet" / "ckpt-0000002" / "trainer.pt", weights_only=True)
    assert [p["rank"] for p in trainer["data_positions"]] == [0, 1]


# Stage 1 with the PatchGAN term on from step 0 (t2i/train/gan.py). grad_accum=1: the adaptive
# weight is a ratio of one micro-batch's gradient norms (averaged over ranks), so only with
# whole-batch micro-batches do 2 ranks see the micro-batch one process sees.
GAN_DDP_SETTINGS = ["train.stage=vae", "train.vae_steps=3", "train.save_every=1",
                    "train.keep_last=0", "train.batch_size=4", "train.grad_accum=1",
                    "vae.disc_weight=0.5", "vae.disc_start=0", "vae.disc_layers=2",
                    "vae.disc_channels=8"]


@pytest.mark.slow
def test_two_gloo_processes_with_the_gan_term_equal_one_process(tmp_path):
    single, multi, _ = one_and_two_processes(tmp_path, GAN_DDP_SETTINGS)
    assert_same_weights(single, multi, [("vae", "ckpt-0000003", name) for name in
                                        ("model.safetensors", "ema.safetensors",
                                         "disc.safetensors")])
    import json
    logs = [[json.loads(x) for x in p.joinpath("metrics.jsonl").read_text().splitlines()]
            for p in (single, multi)]
    assert len(logs[0]) == len(logs[1]) == 3
    for one, two in zip(*logs):  # means over both ranks' rows
        for key in ("loss", "rec_loss", "gan_g", "gan_d", "adaptive_weight", "logits_real",
                    "logits_fake"):
            assert one[key] == pytest.approx(two[key], rel=1e-3, abs=1e-5), key


FINITE_CHECK = """
import os, sys
import torch, torch.distributed as dist
from t2i.train.step import finite_everywhere
dist.init_process_group("gloo")
rank = dist.get_rank()
losses = torch.tensor([1.0, float("nan") if rank == int(sys.argv[1]) else 2.0])
with open(f"{sys.argv[2]}/rank{rank}.txt", "w") as f:  # (stdout lines of ranks interleave)
    f.write(str(bool(finite_everywhere(losses, dist.get_world_size()))))
dist.destroy_process_group()
"""


@pytest.mark.parametrize("nan_rank", [0, 1, -1])
def test_a_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path, nan_rank):
    """The gradients are all-reduced, the loss is not: the skip decision must be too, or one
    rank would skip alone and its replica drift from the others."""
    script = tmp_path / "finite.py"
    script.write_text(FINITE_CHECK)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(nan_rank), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = "False" if nan_rank >= 0 else "True"
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == [expected, expected]


LATENT_SCALE_RANKS = """
import os, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])  # tests/: helpers
from helpers import micro_cfg, run_stage
from t2i.train import unet_stage, vae_stage
out, rank = Path(sys.argv[1]), os.environ["RANK"]
measure, load = vae_stage.measure_latent_scale, unet_stage.load_vae

def measured(*args, **kwargs):
    with open(out.parent / f"measured-rank{rank}.txt", "a") as f:
        f.write("measured\\n")
    return measure(*args, **kwargs)

def loaded(*args, **kwargs):
    vae = load(*args, **kwargs)
    (out.parent / f"stage2-scale-rank{rank}.txt").write_text(repr(float(vae.latent_scale)))
    return vae

vae_stage.measure_latent_scale, unet_stage.load_vae = measured, loaded
sys.exit(run_stage(micro_cfg(*sys.argv[3:]), out))
"""


@pytest.mark.slow
def test_rank_0_alone_measures_the_latent_scale_and_every_rank_trains_on_it(tmp_path):
    """Stage 1's export (EMA weights, latent scale over 8 fresh batches, vae.safetensors) runs
    on rank 0 only: no rank repeats the measurement's reads and bad-sample lines. The others
    wait at the barrier after it, and stage 2 loads rank 0's file on every rank."""
    script = tmp_path / "latent_scale_ranks.py"
    script.write_text(LATENT_SCALE_RANKS)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(tmp_path / "run"), str(Path(__file__).parent), "train.stage=all",
           "train.vae_steps=1", "train.unet_steps=1", "train.save_every=1", "data.workers=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("measured-rank*")) == ["measured-rank0.txt"]
    assert (tmp_path / "measured-rank0.txt").read_text() == "measured\n"  # once
    written = float(load_file(str(tmp_path / "run" / "vae.safetensors"))["latent_scale"])
    scales = [float((tmp_path / f"stage2-scale-rank{r}.txt").read_text()) for r in (0, 1)]
    assert scales == [written, written] and written != 1.0  # measured, not the initial 1

@pytest.mark.slow
def test_a_rank_stopped_by_its_data_leaves_one_error_line_per_rank(tmp_path):
    """Rank 1's shard is all corrupt: it stops at data.max_bad_fraction with its Error line;
    rank 0, waiting in a collective, says it lost the other ranks in one line (no traceback of
    the DDP internals), exit 2 for both."""
    import io
    import tarfile

    from helpers import write_image_shards

    shards = write_image_shards(tmp_path / "shards", shards=1, per_shard=8)
    with tarfile.open(shards / "data_000001.tar", "w") as tar:
        for i in range(8):
            for ext, data in (("jpg", b"not a jpeg"), ("json", b'{"prompt": "x"}')):
                info = tarfile.TarInfo(f"k{i:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    proc = torchrun(tmp_path / "run", MICRO + [
        "train.stage=vae", f"data.source={shards}", "data.bad_check_after=4",
        "train.batch_size=4", "train.grad_accum=1", "data.workers=0"])
    assert proc.returncode != 0
    err = proc.stderr
    assert "[rank 1] Error: data source" in err and "samples were bad" in err
    assert "Error: this process lost the other ranks" in err
    assert "_sync_buffers" not in err and "t2i/train/" not in err  # no t2i traceback
