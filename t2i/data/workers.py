"""DataLoader workers leave stop signals to the main process.

SLURM's scancel, a Kubernetes stop and a shell's Ctrl-C signal the whole process group,
DataLoader workers included. A PyTorch worker dies of SIGTERM (its C handler prints and
re-raises it), and the main process then gets "DataLoader worker (pid N) is killed by signal:
Terminated" at its next SIGCHLD, wherever it is: a stop that should finish the step and save
(t2i/train/signals.py) became a traceback with nothing saved. A worker that ignores SIGINT and
SIGTERM keeps serving batches until the main process, which handles the stop, shuts it down (a
worker also exits when its parent is gone: PyTorch's watchdog).
"""

from __future__ import annotations

import signal


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader `worker_init_fn` (it runs after PyTorch installs the worker's own signal
    handlers): SIGINT and SIGTERM are ignored in this worker (see the module docstring)."""
    del worker_id
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
