"""Ctrl-C and SIGTERM: the training loop stops at a step boundary with a checkpoint of that step
(resuming from it equals an uninterrupted run), a second signal stops at once keeping the last
checkpoint, start-up / setup / export exit 130 (SIGINT) or 143 (SIGTERM) with one line, under
torchrun every rank saves the same step, and every CLI exits 130 on Ctrl-C, never "Aborted!"."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from t2i.train import distributed, loop, signals
from t2i.train.checkpoint import latest_checkpoint, load_checkpoint
from t2i.train.loop import Interrupted, LoopCounters, LoopSettings, fit
from t2i.train.run import Run
from t2i.train.step import apply_update
from helpers import MICRO, micro_cfg, run_stage, toy_settings, toy_state

# ----------------------------------------------------------------------------------------------
# signals.py
# ----------------------------------------------------------------------------------------------


def test_exit_status_and_names():
    assert signals.exit_status(signal.SIGINT) == 130
    assert signals.exit_status(signal.SIGTERM) == 143
    assert signals.signum_of(signals.Terminated()) == signal.SIGTERM
    assert signals.signum_of(KeyboardInterrupt()) == signal.SIGINT
    assert signals.describe(signal.SIGTERM) == "SIGTERM"


def test_immediate_stop_raises_terminated_for_sigterm_and_restores():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(signals.Terminated):
        with signals.immediate_stop():
            signal.raise_signal(signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("escalate", [True, False])
def test_deferred_stop_records_the_first_signal(escalate):
    before = signal.getsignal(signal.SIGINT)
    with signals.deferred_stop(escalate=escalate) as request:
        signal.raise_signal(signal.SIGTERM)
        assert request.signum == signal.SIGTERM
        if escalate:
            with pytest.raises(KeyboardInterrupt) as err:
                signal.raise_signal(signal.SIGINT)
            assert not isinstance(err.value, signals.Terminated)
        else:
            signal.raise_signal(signal.SIGINT)  # torchrun's forwarded copy: ignored
        assert request.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGINT) is before


def test_an_ignored_signal_stays_ignored():
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with signals.deferred_stop(escalate=True) as request:
            signal.raise_signal(signal.SIGTERM)
        assert request.signum is None
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)


# ----------------------------------------------------------------------------------------------
# The loop: stop at a step boundary
# ----------------------------------------------------------------------------------------------


def signalling_step(signal_at: dict[int, list[int]]):
    """A real update; after it, still inside the step, send this process the signals listed
    for that (1-based) step: they land mid-step, where a checkpoint must not be taken."""
    settings = toy_settings(total_steps=100)

    def step(state, batch):
        objective = lambda x: state.model(x).squeeze(1) ** 2  # noqa: E731
        new_state, metrics = apply_update(state, objective, [(batch,)], settings,
                                          contextlib.nullcontext)
        for signum in signal_at.get(new_state.step, []):
            signal.raise_signal(signum)
        return new_state, metrics

    return step


def toy_fit(state, tmp_path: Path, signal_at, save_every: int = 0, total: int = 20):
    settings = LoopSettings(stage="toy", total_steps=total, global_batch=2, log_every=10,
                            sample_every=0, save_every=save_every, keep_last=0,
                            max_nonfinite=10, show_progress=False)
    batches = iter(lambda: torch.ones(2, 3), None)
    return fit(state, signalling_step(signal_at), batches, settings, Run(tmp_path),
               distributed.World(), checkpoint_extra=lambda: {"data_position": {"n": 1}},
               checkpoint_metadata={}, lr_of=lambda s: 0.1)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_step_saves_that_step_after_it_completes(tmp_path, signum):
    state = toy_state()
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as stop:
        toy_fit(state, tmp_path, {3: [signum]})
    assert (stop.value.step, stop.value.signum, stop.value.saved) == (3, signum, True)
    assert stop.value.path == tmp_path / "toy" / "ckpt-0000003"
    saved = load_file(str(stop.value.path / "model.safetensors"))
    for name, value in state.model.state_dict().items():  # the weights after step 3, exactly
        assert torch.equal(saved[name], value), name
    restored, extra = load_checkpoint(stop.value.path, toy_state())
    assert restored.step == 3 and extra["data_position"] == {"n": 1}
    assert LoopCounters.from_extra(extra) == LoopCounters()
    assert signal.getsignal(signal.SIGTERM) is before  # the loop's handlers are gone


def test_a_signal_at_a_save_step_saves_once(tmp_path, monkeypatch):
    saves = []
    real = loop.save_checkpoint

    def counting(stage_dir, state, *args, **kwargs):
        saves.append(state.step)
        return real(stage_dir, state, *args, **kwargs)

    monkeypatch.setattr(loop, "save_checkpoint", counting)
    with pytest.raises(Interrupted) as stop:
        toy_fit(toy_state(), tmp_path, {4: [signal.SIGTERM]}, save_every=2)
    assert saves == [2, 4] and stop.value.path == tmp_path / "toy" / "ckpt-0000004"


def test_a_second_signal_stops_at_once_keeping_the_last_checkpoint(tmp_path):
    with pytest.raises(Interrupted) as stop:
        toy_fit(toy_state(), tmp_path, {5: [signal.SIGINT, signal.SIGTERM]}, save_every=2)
    assert stop.value.saved is False and stop.value.signum == signal.SIGTERM
    assert stop.value.path == tmp_path / "toy" / "ckpt-0000004"
    assert latest_checkpoint(tmp_path / "toy") == tmp_path / "toy" / "ckpt-0000004"


# ----------------------------------------------------------------------------------------------
# launch: start-up, setup and export; the message and the exit status
# ----------------------------------------------------------------------------------------------


def raise_signal(signum):
    def fn(*args, **kwargs):
        signal.raise_signal(signum)
        raise AssertionError("the signal should have raised")
    return fn


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_during_setup_exits_with_its_status(tmp_path, monkeypatch, capsys, signum, status):
    from t2i.train import vae_stage
    monkeypatch.setattr(vae_stage, "build_vae", raise_signal(signum))
    assert run_stage(micro_cfg("train.stage=vae"), tmp_path / "run") == status
    err = capsys.readouterr().err
    assert f"interrupted by {signals.describe(signum)} outside the training steps" in err
    assert "Aborted" not in err and "Traceback" not in err


def test_ctrl_c_during_the_vae_export_then_resume_exports(tmp_path, monkeypatch, capsys):
    from t2i.train import vae_stage
    cfg = micro_cfg("train.stage=vae")
    real = vae_stage.measure_latent_scale
    monkeypatch.setattr(vae_stage, "measure_latent_scale", raise_signal(signal.SIGINT))
    out = tmp_path / "run"
    assert run_stage(cfg, out) == 130
    assert "continue with t2i-train --resume" in capsys.readouterr().err
    assert not (out / "vae.safetensors").exists() and (out / "vae" / "ckpt-0000004").is_dir()
    monkeypatch.setattr(vae_stage, "measure_latent_scale", real)
    assert run_stage(cfg, out, resume=True) == 0
    assert (out / "vae.safetensors").is_file()


def test_the_message_names_the_signal_step_and_checkpoint(tmp_path, monkeypatch, capsys):
    from t2i.cli import launch as launch_mod
    stage_dir = tmp_path / "run" / "vae"

    def stopped(*args, **kwargs):
        raise Interrupted(stage_dir / "ckpt-0000006", 6, signal.SIGTERM)

    monkeypatch.setattr(launch_mod, "train", stopped)
    cfg = micro_cfg("train.stage=vae")
    Run(tmp_path / "run").write_config(cfg)  # as the stage writes it once set up
    assert run_stage(cfg, tmp_path / "run", resume=True) == 143
    err = capsys.readouterr().err
    assert (f"interrupted by SIGTERM at step 6: checkpoint saved in {stage_dir / 'ckpt-0000006'}; "
            f"continue with t2i-train --resume {tmp_path / 'run'}") in err


# ----------------------------------------------------------------------------------------------
# CLIs: 130 / 143, never click's "Aborted!" and 1
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_train_cli_start_up(tmp_path, monkeypatch, signum, status):
    from t2i.cli import train as train_cli
    monkeypatch.setattr(train_cli, "resolve", raise_signal(signum))
    result = CliRunner().invoke(train_cli.main, ["--out", str(tmp_path / "r")])
    assert result.exit_code == status, (result.output, result.exception)
    assert f"interrupted by {signals.describe(signum)}" in result.output
    assert "Aborted" not in result.output


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sample_cli(tmp_path, monkeypatch, signum, status):
    from t2i.cli import sample as sample_cli
    monkeypatch.setattr(sample_cli, "load_pipeline", raise_signal(signum))
    result = CliRunner().invoke(sample_cli.main, [str(tmp_path), "a red circle"])
    assert result.exit_code == status, (result.output, result.exception)
    assert "Aborted" not in result.output


def test_data_cli_ctrl_c_exits_130(tmp_path, monkeypatch):
    import t2i.data.pack
    from t2i.cli import data as data_cli
    monkeypatch.setattr(t2i.data.pack, "export_shapes", raise_signal(signal.SIGINT))
    result = CliRunner().invoke(data_cli.main, ["shapes", str(tmp_path / "o"), "--count", "1"])
    assert result.exit_code == 130, (result.output, result.exception)
    assert "interrupted by SIGINT (Ctrl-C)" in result.output and "Aborted" not in result.output


# ----------------------------------------------------------------------------------------------
# Real processes: SIGTERM to t2i-train, and to torchrun
# ----------------------------------------------------------------------------------------------

STOP_SETTINGS = ["train.stage=vae", "train.lr_schedule=constant", "train.save_every=0"]


def start_training(cmd: list[str], tmp_path: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "stdout.txt", "w") as out, open(tmp_path / "stderr.txt", "w") as err:
        return subprocess.Popen(cmd, stdout=out, stderr=err, env=env)  # files, not pipes


def wait_for_steps(proc: subprocess.Popen, out: Path, steps: int, timeout: float = 300) -> None:
    """Until metrics.jsonl holds `steps` records (the run is inside the training loop)."""
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + timeout
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= steps):
        assert proc.poll() is None, "the run ended before it was signalled"
        assert time.monotonic() < deadline, "the run did not start training in time"
        time.sleep(0.1)


@contextlib.contextmanager
def one_thread():
    """The subprocess runs with OMP_NUM_THREADS=1; so do the in-process runs it is compared to
    (thread count changes CPU reduction order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_sigterm_to_t2i_train_saves_and_resume_equals_uninterrupted(tmp_path):
    out = tmp_path / "run"
    sets = [a for item in MICRO + STOP_SETTINGS + ["train.vae_steps=100000"]
            for a in ("--set", item)]
    proc = start_training([sys.executable, "-m", "t2i.cli.train", "--preset", "tiny", *sets,
                           "--out", str(out), "--device", "cpu", "--log-every", "1"], tmp_path)
    try:
        wait_for_steps(proc, out, 3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143
    finally:
        proc.kill()
    err = (tmp_path / "stderr.txt").read_text()
    found = re.search(r"interrupted by SIGTERM at step (\d+): checkpoint saved in (\S+);", err)
    assert found, err[-3000:]
    step, ckpt = int(found.group(1)), Path(found.group(2))
    assert ckpt == out / "vae" / f"ckpt-{step:07d}" and ckpt.is_dir() and "Traceback" not in err
    total = [*STOP_SETTINGS, f"train.vae_steps={step + 2}"]
    with one_thread():
        assert run_stage(micro_cfg(*total), out, resume=True) == 0
        assert run_stage(micro_cfg(*total), tmp_path / "straight") == 0
    final = f"vae/ckpt-{step + 2:07d}"
    for name in (f"{final}/model.safetensors", f"{final}/ema.safetensors", "vae.safetensors"):
        a, b = load_file(str(out / name)), load_file(str(tmp_path / "straight" / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)


@pytest.mark.slow
def test_sigterm_to_torchrun_saves_the_same_step_on_every_rank(tmp_path):
    """Kubernetes signals torchrun, which forwards SIGTERM to each worker: the ranks agree on
    the stop step at the next check (every log step here) and save it together."""
    out = tmp_path / "run"
    sets = [a for item in MICRO + STOP_SETTINGS + ["train.vae_steps=100000"]
            for a in ("--set", item)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "t2i.cli.train", "--preset", "tiny", *sets, "--out", str(out), "--device", "cpu",
           "--log-every", "2"]
    proc = start_training(cmd, tmp_path)
    try:
        wait_for_steps(proc, out, 2)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        proc.kill()
    err = (tmp_path / "stderr.txt").read_text()
    found = re.search(r"interrupted by SIGTERM at step (\d+): checkpoint saved in (\S+);", err)
    assert found, err[-3000:]
    step = int(found.group(1))
    assert step % 2 == 0  # a check step: both ranks stopped at the same one
    assert err.count("interrupted by SIGTERM") == 1  # rank 0 alone reports
    trainer = torch.load(out / "vae" / f"ckpt-{step:07d}" / "trainer.pt", weights_only=True)
    assert trainer["step"] == step
    assert [p["batches"] for p in trainer["data_positions"]] == [step, step]  # both ranks


# ----------------------------------------------------------------------------------------------
# Console-script entry points (t2i/cli/entry.py)
# ----------------------------------------------------------------------------------------------


def test_ctrl_c_while_a_command_imports_exits_130_with_one_line(tmp_path, monkeypatch, capsys):
    """The seconds a console script spends importing torch: Ctrl-C there is one line, 130."""
    from t2i.cli import entry

    (tmp_path / "slow_command.py").write_text("raise KeyboardInterrupt\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SystemExit) as stop:
        entry.run("slow_command")
    assert stop.value.code == 130
    assert capsys.readouterr().err == "\ninterrupted by SIGINT (Ctrl-C) during start-up\n"


def test_every_console_script_runs_its_commands_main(monkeypatch):
    import configparser

    import click

    from t2i.cli import entry

    parser = configparser.ConfigParser()
    parser.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    scripts = dict(line.split(" = ") for line in
                   parser["options.entry_points"]["console_scripts"].strip().splitlines())
    called = []
    real_import = entry.importlib.import_module
    monkeypatch.setattr(entry.importlib, "import_module",
                        lambda name: type("M", (), {"main": staticmethod(
                            lambda: called.append(name))}))
    for script, target in scripts.items():
        module, function = target.split(":")
        assert module == "t2i.cli.entry"
        getattr(entry, function)()
    assert called == ["t2i.cli.train", "t2i.cli.sample", "t2i.cli.eval", "t2i.cli.data",
                      "bench.__main__"]
    for name in called:  # each names a module whose main is a click command
        assert isinstance(real_import(name).main, click.Command)


def test_the_resume_hint_under_torchrun_names_the_launch_it_needs(tmp_path, monkeypatch):
    """A checkpoint resumes with the process count that saved it: plain t2i-train is refused."""
    from t2i.cli.launch import resume_command

    run = Run(tmp_path / "run")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resume_command(run) == f"t2i-train --resume {run.dir}"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert resume_command(run) == (f"the same torchrun launch: torchrun --nproc_per_node 2 -m "
                                   f"t2i.cli.train --resume {run.dir}")
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert resume_command(run) == (f"the same torchrun launch on each of its 2 nodes: torchrun "
                                   f"--nproc_per_node 8 -m t2i.cli.train --resume {run.dir}")


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_dataloader_workers_saves(tmp_path):
    """scancel and Kubernetes signal the whole process group: DataLoader workers died of the
    SIGTERM and the trainer crashed ("DataLoader worker ... killed by signal: Terminated")
    with nothing saved, and a first run's folder was removed. Workers now ignore stop signals
    and the trainer stops as it does alone: the step finished, a checkpoint, exit 143."""
    from helpers import write_image_shards

    shards = write_image_shards(tmp_path / "shards", shards=2, per_shard=8)
    out = tmp_path / "run"
    sets = [a for item in MICRO + STOP_SETTINGS + ["train.vae_steps=100000", "data.workers=2",
                                                    f"data.source={shards}"]
            for a in ("--set", item)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "stdout.txt", "w") as stdout, open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "t2i.cli.train", "--preset", "tiny", *sets,
                                 "--out", str(out), "--device", "cpu", "--log-every", "1"],
                                stdout=stdout, stderr=err, env=env, start_new_session=True)
    try:
        wait_for_steps(proc, out, 3)
        os.killpg(proc.pid, signal.SIGTERM)  # the trainer and its DataLoader workers
        assert proc.wait(timeout=120) == 143
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    err = (tmp_path / "stderr.txt").read_text()
    found = re.search(r"interrupted by SIGTERM at step (\d+): checkpoint saved in (\S+);", err)
    assert found and "Traceback" not in err and "killed by signal" not in err, err[-3000:]
    assert Path(found.group(2)).is_dir()
