"""Every bad command-line value is one line, `Error: ...` naming the option or config key, exit
status 2, and is refused before any work starts (no run folder, no stage trained, no model
loaded). Also the CPU thread choice of the commands (issue 13, sections 4 and 7)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import click
import pytest
import torch
from PIL import Image

from bench.__main__ import main as bench_cli
from t2i.cli import common
from t2i.cli.common import FiniteFloat, choose_threads, output_dir, pick_device, set_threads
from t2i.cli.data import main as data_cli
from t2i.cli.eval import main as eval_cli
from t2i.cli.sample import main as sample_cli
from t2i.cli.train import main as train_cli
from helpers import invoke


pytestmark = pytest.mark.usefixtures("keep_threads")  # conftest.py


@pytest.fixture
def no_work(monkeypatch, tmp_path):
    """Run in an empty folder; record any call that would start work (training, loading)."""
    import t2i.cli.eval
    import t2i.cli.sample
    import t2i.cli.launch

    calls = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(t2i.cli.launch, "launch", lambda *a, **k: calls.append(("launch", a)) or 0)
    for module in (t2i.cli.sample, t2i.cli.eval):
        monkeypatch.setattr(module, "load_pipeline", lambda *a, **k: calls.append(("load", a)))
    return calls


def one_error_line(result) -> str:
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


# ----------------------------------------------------------------------------------------------
# t2i-train
# ----------------------------------------------------------------------------------------------

TRAIN_BAD = [
    (["--grad-accum", "0"], "--grad-accum"),
    (["--log-every", "0"], "--log-every"),
    (["--steps", "0", "--stage", "unet"], "--steps"),
    (["--batch-size", "-4"], "--batch-size"),
    (["--lr", "inf"], "--lr"),
    (["--vae-lr", "nan"], "--vae-lr"),
    (["--cond-drop", "1.5"], "--cond-drop"),
    (["--ema-decay", "2"], "--ema-decay"),
    (["--precision", "fp8"], "--precision"),
    (["--lr-schedule", "bogus"], "--lr-schedule"),
    (["--workers", "-1"], "--workers"),
    (["--keep-last", "-1"], "--keep-last"),
    (["--threads", "0"], "--threads"),
    (["--device", "tpu"], "--device"),
    (["--device", "meta"], "--device"),
    (["--set", "data.resolution=30"], "data.resolution"),
    (["--set", "train.precision=fp8"], "train.precision"),
    (["--set", "schedule.beta_schedule=bogus"], "schedule.beta_schedule"),
    (["--set", "train.stage=foo"], "train.stage"),
    (["--set", "train.lr_schedule=bogus"], "train.lr_schedule"),
    (["--set", "train.recon_loss=l3"], "train.recon_loss"),
    (["--set", "train.cond_drop=1.5"], "train.cond_drop"),
    (["--set", "train.ema_decay=2"], "train.ema_decay"),
    (["--set", "train.max_nonfinite=0"], "train.max_nonfinite"),
    (["--set", "train.vae_lr=Infinity"], "train.vae_lr"),
    (["--set", "train.unet_lr=NaN"], "train.unet_lr"),
    (["--set", "train.unet_steps=0", "--stage", "unet"], "train.unet_steps"),
    # what the model and schedule constructors refused only after stage 1 had trained
    (["--set", "unet.num_heads=3"], "unet.num_heads"),
    (["--set", "unet.attention_levels=true"], "unet.attention_levels"),
    (["--set", "schedule.prediction_type=x0"], "schedule.prediction_type"),
    (["--set", "text.model=NoSuchNet"], "text.model"),
    (["--set", "text.weights=missing.safetensors"], "text.weights"),
]


@pytest.mark.parametrize("args, names", TRAIN_BAD, ids=[" ".join(a) for a, _ in TRAIN_BAD])
def test_train_refuses_bad_values_before_any_work(no_work, tmp_path, args, names):
    line = one_error_line(invoke(train_cli, *args, "--out", tmp_path / "run"))
    assert names in line
    assert no_work == []  # no stage started
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("out", ["notes.txt", "notes.txt/run"])
def test_train_out_must_be_a_folder(no_work, tmp_path, out):
    (tmp_path / "notes.txt").write_text("not a folder")
    line = one_error_line(invoke(train_cli, "--out", tmp_path / out))
    assert "--out" in line and "notes.txt" in line
    assert no_work == [] and (tmp_path / "notes.txt").read_text() == "not a folder"


def test_train_with_good_values_reaches_the_launch_with_them(no_work, tmp_path):
    """The control for the refusals above: the same harness lets a good command through."""
    result = invoke(train_cli, "--grad-accum", "2", "--cond-drop", "0.2", "--threads", "1",
                    "--set", "train.vae_lr=3e-4", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    [(name, args)] = no_work
    cfg = args[0]
    assert name == "launch" and cfg.train.grad_accum == 2 and cfg.train.cond_drop == 0.2
    assert cfg.train.vae_lr == 3e-4
    assert torch.get_num_threads() == 1


# ----------------------------------------------------------------------------------------------
# t2i-sample and its --init-image
# ----------------------------------------------------------------------------------------------


def png_bytes(size: tuple[int, int] = (8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that is only a signature and an IHDR chunk claiming width x height pixels."""
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr
            + struct.pack(">I", zlib.crc32(ihdr) & 0xFFFFFFFF))


INIT_IMAGES = {
    "notes.txt": lambda: b"shopping: eggs, milk\n",
    "truncated.png": lambda: png_bytes((64, 64))[:60],
    "bomb.png": lambda: png_header(30000, 30000),
}


@pytest.mark.parametrize("name", sorted(INIT_IMAGES))
def test_sample_refuses_an_init_image_it_cannot_use_before_loading(no_work, tmp_path, name):
    (tmp_path / name).write_bytes(INIT_IMAGES[name]())
    line = one_error_line(invoke(sample_cli, tmp_path / "run", "a", "--init-image",
                                 tmp_path / name))
    assert "--init-image" in line and name in line
    assert no_work == []


def test_sample_reads_a_good_init_image_then_loads_the_run(no_work, tmp_path):
    (tmp_path / "good.png").write_bytes(png_bytes())
    invoke(sample_cli, tmp_path / "run", "a", "--init-image", tmp_path / "good.png")
    assert [name for name, _ in no_work] == ["load"]  # got past the checks


SAMPLE_BAD = [
    (["--height", "0", "--width", "0"], "--height"),
    (["--width", "-32"], "--width"),
    (["--steps", "0"], "--steps"),
    (["--batch-size", "0"], "--batch-size"),
    (["--strength", "1.5"], "--strength"),
    (["--strength", "nan"], "--strength"),
    (["--guidance", "inf"], "--guidance"),
    (["--guidance", "-1"], "--guidance"),
    (["--threads", "0"], "--threads"),
    (["--device", "tpu"], "--device"),
    (["--sampler", "ddpm"], "--sampler"),
    (["--precision", "fp8"], "--precision"),
    (["--init-image", "missing.png"], "--init-image"),
]


@pytest.mark.parametrize("args, option", SAMPLE_BAD, ids=[" ".join(a) for a, _ in SAMPLE_BAD])
def test_sample_refuses_bad_values_before_loading(no_work, tmp_path, args, option):
    assert option in one_error_line(invoke(sample_cli, tmp_path / "run", "a", *args))
    assert no_work == []


@pytest.mark.parametrize("cli, args", [(sample_cli, ["a"]), (eval_cli, ["--suite", "shapes"])])
def test_out_an_existing_file_is_refused_before_loading(no_work, tmp_path, cli, args):
    (tmp_path / "notes.txt").write_text("keep me")
    line = one_error_line(invoke(cli, tmp_path / "run", *args, "--out", tmp_path / "notes.txt"))
    assert "--out" in line
    assert no_work == [] and (tmp_path / "notes.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------------------------
# t2i-eval and t2i-bench
# ----------------------------------------------------------------------------------------------

EVAL_BAD = [
    (["--n", "0"], "--n"),
    (["--n-held-out", "-1"], "--n-held-out"),
    (["--steps", "0"], "--steps"),
    (["--batch-size", "0"], "--batch-size"),
    (["--guidance", "nan"], "--guidance"),
    (["--threads", "0"], "--threads"),
    (["--device", "tpu"], "--device"),
    (["--sampler", "ddpm"], "--sampler"),
]


@pytest.mark.parametrize("args, option", EVAL_BAD, ids=[" ".join(a) for a, _ in EVAL_BAD])
def test_eval_refuses_bad_values_before_loading(no_work, tmp_path, args, option):
    line = one_error_line(invoke(eval_cli, tmp_path / "run", "--suite", "shapes", *args))
    assert option in line
    assert no_work == []


@pytest.mark.parametrize("args, option", [
    (["--resolution", "30"], "--resolution"),
    (["--threads", "0"], "--threads"),
    (["--device", "tpu"], "--device"),
    (["--batch", "0"], "--batch"),
])
def test_bench_refuses_bad_values_in_one_line(args, option):
    assert option in one_error_line(invoke(bench_cli, "schedulers", *args))


@pytest.mark.parametrize("args, names", [
    (["shapes", "out", "--count", "0"], "--count"),
    (["inspect", "shapes", "--limit", "0"], "--limit"),
    (["inspect"], "SOURCE"),
    (["bogus"], "bogus"),
])
def test_data_usage_errors_are_one_line(tmp_path, monkeypatch, args, names):
    monkeypatch.chdir(tmp_path)
    assert names in one_error_line(invoke(data_cli, *args))
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# The pieces
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("requested", ["tpu", "meta", "cuda:x", "mps", ""])
def test_pick_device_takes_cpu_cuda_or_cuda_n_only(requested):
    with pytest.raises(common.UserError, match="--device"):
        pick_device(requested)
    assert pick_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_pick_device_refuses_cuda_without_a_gpu():
    with pytest.raises(common.UserError, match="no CUDA GPU"):
        pick_device("cuda:0")


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "2", "-0.5"])
def test_finite_float_refuses_non_finite_and_out_of_range(text):
    with pytest.raises(click.BadParameter):
        FiniteFloat(0, 1).convert(text, None, None)
    assert FiniteFloat(0, 1).convert("0.25", None, None) == 0.25


def test_output_dir_needs_folders_up_to_the_first_existing_one(tmp_path):
    (tmp_path / "file").write_text("x")
    for bad in ("file", "file/sub/deeper"):
        with pytest.raises(click.BadParameter, match="is a file"):
            output_dir(None, None, str(tmp_path / bad))
    assert output_dir(None, None, str(tmp_path / "new" / "deeper")) == str(tmp_path / "new" / "deeper")
    assert not (tmp_path / "new").exists()  # checking creates nothing


@pytest.mark.parametrize("cores, workers, requested, env, expected", [
    (2, 0, None, None, 2),  # all usable cores
    (16, 4, None, None, 12),  # one core per DataLoader worker process
    (2, 4, None, None, 1),  # at least one
    (64, 0, 3, None, 3),  # --threads wins
    (64, 0, 3, "8", 3),  # ... also over OMP_NUM_THREADS
    (64, 8, None, "1", 1),  # OMP_NUM_THREADS is the user's choice (torchrun sets 1)
    (64, 8, None, "4,2", 4),  # nested OpenMP lists: the outer level
    (8, 2, None, "0", 6),  # not a usable count: ignored
    (8, 2, None, "many", 6),
])
def test_choose_threads(cores, workers, requested, env, expected):
    assert choose_threads(cores, workers, requested, env) == expected


def test_set_threads_sets_torch_and_reads_the_environment(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert set_threads(None, workers=0) == 1 == torch.get_num_threads()
    assert set_threads(3) == 3 == torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(common, "available_cores", lambda: 5)
    assert set_threads(None, workers=2) == 3 == torch.get_num_threads()


def test_available_cores_follows_the_affinity_and_a_cgroup_quota(monkeypatch):
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: "max 100000\n")
    assert common.available_cores() == 4
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: "150000 100000\n")
    assert common.available_cores() == 2  # docker --cpus=1.5: 2 threads
