"""SIGINT and SIGTERM during training: stop at a step boundary, with the checkpoint saved.

The :class:`~.trainer.Trainer` holds :class:`StopSignals` around its loop. The first SIGINT or
SIGTERM only records the signal. The Trainer reads it in the all-reduce it already does once
per optimizer step (``Trainer.step``), so under ``torchrun``, which passes the signal to every
rank, all ranks agree on the same last step and none is left waiting for another. It then saves
the rolling checkpoint (atomically), logs one line and raises
:class:`~star_mamba.errors.Interrupted`: the command line exits with 128 + the signal (130 for
SIGINT, 143 for SIGTERM). A second signal exits at once (an atomic save it cuts short leaves a
``*.tmp`` file, which the next run removes). Handlers are installed only in the main thread
(Python allows no other) and the previous ones are restored when the loop ends.

When a torchrun worker dies, the agent SIGTERMs the others: their next step's all-reduce
cannot complete (gloo fails at once; NCCL waits), and the agent SIGKILLs what is left after its
grace period, as before; the rolling checkpoint is then the last one saved.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_BASE = 128  # a process ended by signal N exits with 128 + N (shell convention)


class StopSignals:
    """Records the first of :data:`SIGNALS` (``received``); a second one ends the process."""

    def __init__(self):
        self.received: Optional[int] = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signum
            return
        name = signal.Signals(signum).name
        os.write(2, f"star-mamba: second signal ({name}): exiting at once\n".encode())
        os._exit(EXIT_BASE + signum)
