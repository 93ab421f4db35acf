"""The multi-process rehearsal of the real workload on CPU: `torchrun --nproc_per_node 2` (gloo)
trains both stages on shards in the text-to-image-2M layout whose sizes are uneven, one of them
empty, for several epochs; then a second torchrun resumes a copy of the run from a middle
checkpoint to the last step. Neither may hang (subprocess timeouts) or report a rank error; the
resumed run ends at the last step with the weights of the run that went straight there."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from t2i.data.pack import jpeg_bytes, sample_json
from helpers import MICRO, assert_bitwise_equal

# Samples per shard: 15 in all, one shard empty. The empty one is dropped before the rank split,
# so one rank reads two shards an epoch and the other one: the ranks' epochs end at other steps.
SHARD_SIZES = {"data_000000.tar": 7, "data_000001.tar": 0, "data_000002.tar": 3,
               "data_000003.tar": 5}
# Global batch 4 = 2 per rank: a 15-sample epoch lasts < 4 steps, so 10 steps are ~3 epochs.
SETTINGS = ["train.stage=all", "train.vae_steps=2", "train.batch_size=4", "train.save_every=3",
            "train.keep_last=0", "train.sample_every=0", "data.shuffle_buffer=4"]
RESUME_STEP, TOTAL_STEPS = 6, 10  # checkpoints every 3 steps and at the end
TIMEOUT_S = 300  # a hang (a rank waiting in a collective) fails here instead of stalling CI


def write_uneven_shards(folder: Path) -> None:
    """SHARD_SIZES samples of KEY.jpg (20x20 noise) + KEY.json {"prompt"} with globally unique
    9-digit keys, as in data_512_2M."""
    folder.mkdir(parents=True)
    rng, index = np.random.default_rng(0), 0
    for name, count in SHARD_SIZES.items():
        with tarfile.open(folder / name, "w", format=tarfile.USTAR_FORMAT) as tar:
            for _ in range(count):
                pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
                files = {"jpg": jpeg_bytes(Image.fromarray(pixels), 90),
                         "json": sample_json(f"a picture of noise number {index}")}
                for ext, data in files.items():
                    info = tarfile.TarInfo(f"{index:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                index += 1


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 -m t2i.cli.train ARGS` on the CPU."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "t2i.cli.train", "--device", "cpu", "--log-every", "1", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)


def new_run(data: Path, out: Path, unet_steps: int) -> list[str]:
    """The arguments of a new MICRO + SETTINGS run on `data` into `out`."""
    sets = [*MICRO, *SETTINGS, f"train.unet_steps={unet_steps}"]
    return ["--preset", "tiny", *[a for item in sets for a in ("--set", item)], "--data", str(data),
            "--out", str(out)]


def check_clean_exit(proc: subprocess.CompletedProcess) -> None:
    """Exit 0, rank 0 alone reports the end, no worker failed or printed a rank error."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done: ") == 1, proc.stdout[-2000:]
    for sign in ("Traceback", "[rank", "ChildFailedError", "Error:"):
        assert sign not in proc.stderr, proc.stderr[-3000:]


def unet_steps_logged(run: Path) -> list[int]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if r.get("stage") == "unet"]


@pytest.mark.slow
def test_torchrun_on_uneven_shards_with_an_empty_one_trains_and_resumes(tmp_path):
    data, run, resumed = tmp_path / "shards", tmp_path / "run", tmp_path / "resumed"
    write_uneven_shards(data)

    check_clean_exit(torchrun(*new_run(data, run, TOTAL_STEPS)))
    assert (run / "vae.safetensors").is_file()
    final = run / "unet" / f"ckpt-{TOTAL_STEPS:07d}"
    trainer = torch.load(final / "trainer.pt", weights_only=True)
    assert trainer["step"] == TOTAL_STEPS
    positions = trainer["data_positions"]
    assert [p["rank"] for p in positions] == [0, 1]
    assert [p["batches"] for p in positions] == [TOTAL_STEPS, TOTAL_STEPS]
    assert all(p["num_shards"] == 3 for p in positions)  # the empty shard dropped on both ranks
    assert unet_steps_logged(run) == list(range(1, TOTAL_STEPS + 1))

    # As after a preemption: the run's copy resumes from its step-6 checkpoint (the later ones
    # are removed) and continues to step 10, through the ranks' epoch ends once more.
    shutil.copytree(run, resumed)
    middle = resumed / "unet" / f"ckpt-{RESUME_STEP:07d}"
    check_clean_exit(torchrun("--resume", str(middle)))
    assert (resumed / "unet" / "latest").read_text().strip() == final.name
    assert unet_steps_logged(resumed) == list(range(1, TOTAL_STEPS + 1))  # each step once
    for name in ("model.safetensors", "ema.safetensors"):
        assert_bitwise_equal(load_file(str(resumed / "unet" / final.name / name)),
                             load_file(str(final / name)))


@pytest.mark.slow
def test_torchrun_stage_2_on_latent_shards_split_by_samples_resumes_exactly(tmp_path):
    """The recipe's stage 2: latent shards (15 samples in 3 shards of 7, 3 and 5) split by
    samples over 2 ranks x 2 DataLoader workers (shares of 3, 4, 4 and 4: segments start and
    stop inside shards), resumed from a middle checkpoint: the same weights, bit for bit."""
    from helpers import micro_cfg, save_random_vae, write_latent_shards

    images, latents = tmp_path / "shards", tmp_path / "latents"
    run, resumed = tmp_path / "run", tmp_path / "resumed"
    write_uneven_shards(images)
    cfg = micro_cfg(f"data.source={images}")
    vae = save_random_vae(cfg, tmp_path / "vae.safetensors")
    write_latent_shards(images, latents, cfg, vae)
    args = [a for item in ("train.stage=unet", "data.workers=2") for a in ("--set", item)]
    start = new_run(latents, run, TOTAL_STEPS) + args + ["--vae", str(vae)]
    check_clean_exit(torchrun(*start))
    final = run / "unet" / f"ckpt-{TOTAL_STEPS:07d}"
    positions = torch.load(final / "trainer.pt", weights_only=True)["data_positions"]
    assert [(p["kind"], p["split"], p["streams"]) for p in positions] == [
        ("latent_shards", "samples", 2)] * 2

    shutil.copytree(run, resumed)
    check_clean_exit(torchrun("--resume", str(resumed / "unet" / f"ckpt-{RESUME_STEP:07d}")))
    assert unet_steps_logged(resumed) == list(range(1, TOTAL_STEPS + 1))
    for name in ("model.safetensors", "ema.safetensors"):
        assert_bitwise_equal(load_file(str(resumed / "unet" / final.name / name)),
                             load_file(str(final / name)))
