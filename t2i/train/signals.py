"""Stop signals: Ctrl-C (SIGINT) and SIGTERM (what SLURM, Kubernetes and torchrun send before
they kill a job) end a run the same way, at a point where the state can be saved.

Two modes, chosen by the code that knows whether stopping *now* is safe:

- `immediate_stop` (start-up, setup, the VAE export, t2i-sample / t2i-eval / t2i-data):
  SIGINT raises KeyboardInterrupt and SIGTERM raises `Terminated`, a KeyboardInterrupt
  subclass, in the main thread, so one `except KeyboardInterrupt` handles both.
- `deferred_stop` (the training loop): the handler only records the signal in a `StopRequest`;
  the loop acts on it at a step boundary, where weights, EMA, optimizer, step and data position
  agree, and saves a checkpoint there (a signal raised inside a step could land between the
  optimizer update and the step counter, and a checkpoint of that state would not resume
  bitwise). Under torchrun the ranks agree on the stop step through an all-reduce (loop.py).
  In one process a second signal raises at once ("stop now": nothing saved, the last
  checkpoint kept); under torchrun repeated signals are normal (torchrun forwards the signal
  that the shell or SLURM already sent to every process) and change nothing.

Exit status after a stop: 128 + the signal number, what a shell reports for a process that
signal killed: 130 for SIGINT, 143 for SIGTERM. A handler that was SIG_IGN (e.g. `nohup`)
stays ignored.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, NoReturn

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread where Ctrl-C raises KeyboardInterrupt."""


def signum_of(err: KeyboardInterrupt) -> int:
    """The signal behind an interrupt: SIGTERM for `Terminated`, SIGINT for any other."""
    return signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT


def exit_status(signum: int) -> int:
    """128 + signum: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + int(signum)


def describe(signum: int) -> str:
    """'SIGINT (Ctrl-C)' or 'SIGTERM', for messages."""
    return "SIGINT (Ctrl-C)" if signum == signal.SIGINT else signal.Signals(signum).name


def raise_for(signum: int) -> NoReturn:
    """Raise what the signal means in the main thread: Terminated or KeyboardInterrupt."""
    if signum == signal.SIGTERM:
        raise Terminated()
    raise KeyboardInterrupt()


@dataclass
class StopRequest:
    """The first stop signal received while deferred (None: none). Written only by the handler
    that `deferred_stop` installs; read by the training loop at step boundaries."""

    signum: int | None = None


@contextlib.contextmanager
def immediate_stop() -> Iterator[None]:
    """For the block (or the decorated function): SIGINT -> KeyboardInterrupt, SIGTERM ->
    Terminated. The previous handlers are restored afterwards."""
    with _installed(lambda signum, frame: raise_for(signum)):
        yield


@contextlib.contextmanager
def deferred_stop(escalate: bool) -> Iterator[StopRequest]:
    """For the block: record the first SIGINT / SIGTERM in the yielded StopRequest and carry
    on. With `escalate` a second signal raises at once (as `raise_for`); without, it is
    ignored. The previous handlers are restored afterwards."""
    request = StopRequest()

    def handler(signum: int, frame: object) -> None:
        if request.signum is None:
            request.signum = signum
        elif escalate:
            raise_for(signum)

    with _installed(handler):
        yield request


@contextlib.contextmanager
def _installed(handler: Callable[[int, object], None]) -> Iterator[None]:
    """Install `handler` for SIGINT and SIGTERM unless ignored (SIG_IGN); restore on exit.
    Python delivers signals to the main thread only: elsewhere nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s, old in previous.items():
        if old is not signal.SIG_IGN:
            signal.signal(s, handler)
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)
