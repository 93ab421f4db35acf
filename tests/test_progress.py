"""The training progress line: its ETA leaves out the compile and warm-up before the first update."""

from __future__ import annotations

import io

from t2i.train.run import Progress


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def eta_field(line: str) -> str:
    return line.rsplit("ETA ", 1)[1].strip()


def test_eta_ignores_a_slow_first_interval_and_counts_the_steady_rate():
    clock, out = FakeClock(), io.StringIO()
    progress = Progress("unet", start=0, total=1010, global_batch=32, stream=out, clock=clock)
    clock.now = 600.0  # 10 steps, a 10-minute compile among them
    progress.update(10, loss=0.5, samples_per_s=64.0)  # the rate without the first step
    clock.now = 610.0  # 10 s for the next 10 steps: 1 s per step
    progress.update(20, loss=0.4, samples_per_s=32.0)
    first, second = out.getvalue().splitlines()
    # first update: 1000 steps x 32 samples / 64 samples/s = 500 s, not 600 / 10 * 1000 s
    assert eta_field(first) == "0:08:20"
    # second: 1 s per step since the first update x 990 steps left
    assert eta_field(second) == "0:16:30"
    assert "elapsed 0:10:10" in second


def test_eta_of_a_resumed_run_counts_steps_from_the_resume():
    clock, out = FakeClock(), io.StringIO()
    progress = Progress("unet", start=500, total=600, global_batch=8, stream=out, clock=clock)
    clock.now = 5.0
    progress.update(510, loss=0.5, samples_per_s=80.0)
    clock.now = 7.0
    progress.update(520, loss=0.5, samples_per_s=40.0)
    assert eta_field(out.getvalue().splitlines()[1]) == "0:00:16"  # 0.2 s per step x 80 left


def test_hidden_progress_writes_nothing():
    out = io.StringIO()
    Progress("vae", 0, 10, 4, stream=out, enabled=False).update(5, 0.1, 10.0)
    assert out.getvalue() == ""
