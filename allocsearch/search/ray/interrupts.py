"""SIGINT (Ctrl-C) and SIGTERM while a search runs: the controller is told (``controller.interrupt``), Tune
stops every trial (``StopOnRequest.stop_all``) and the controller records them with their last checkpoint.
A second SIGINT raises KeyboardInterrupt at once. Installed after ``ray.init``, whose own SIGTERM handler
would otherwise abort the process and leave trials RUNNING; only in the main thread.
"""
from __future__ import annotations

import signal
import threading


class Interrupts:
    """SIGINT / SIGTERM during the search -> ``controller.interrupt``: Tune stops every trial, and the
    controller records them. A second SIGINT raises KeyboardInterrupt at once. (Main thread only.)"""

    def __init__(self, controller):
        self.controller, self.previous = controller, {}

    def _handle(self, signum, frame) -> None:
        self.controller.interrupt(signal.Signals(signum).name)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():  # None: a handler set outside Python (Ray's): default
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
