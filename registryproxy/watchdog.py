"""A stop that never hangs: the process exits by a deadline, whatever holds it.

Each part's stop has its own deadline (:data:`.runtime.STOP_SECONDS`), but a
part that waits on something that never answers in a way no deadline
reaches (a thread in a call on a hung disk that the reactor's thread joins,
a library's lock) would still keep regproxy from exiting after ``SIGTERM``,
until a supervisor kills it without a word.  The watchdog is armed when the
reactor begins to shut down (twistd's process only) and never disarmed: if
the process still runs at its deadline, whatever phase of the stop holds it
(the services, the reactor's own thread pool joined, the interpreter's
exit), it logs where every thread is and exits with status 1.  It runs in
a thread of its own: the reactor's thread may be the stuck one.
"""

from __future__ import annotations

import os
import sys
import threading
import traceback
from collections.abc import Callable

from twisted.logger import Logger

log = Logger()

#: what a stop may take beyond ``proxy.shutdown_grace``: the downloads whose
#: bytes are all in published, the index closed, the cluster left, each part
#: given STOP_SECONDS
MARGIN_SECONDS = 60.0


def stacks() -> str:
    """Where every thread of the process is."""
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    return "\n".join(
        f"thread {names.get(ident, ident)}:\n" + "".join(traceback.format_stack(frame))
        for ident, frame in sys._current_frames().items()
    )


class Watchdog:
    def __init__(self, seconds: float, exit: Callable[[int], object] = os._exit) -> None:
        self.seconds = seconds
        self._exit = exit
        self._timer: threading.Timer | None = None

    def arm(self) -> None:
        """Start counting (again: nothing more)."""
        if self._timer is not None:
            return
        self._timer = threading.Timer(min(self.seconds, threading.TIMEOUT_MAX), self._fire)
        self._timer.name = "regproxy-stop-watchdog"
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        log.critical(
            "stopping took over {seconds}s (proxy.shutdown_grace and a margin): "
            "exiting without what still runs, which is:\n{stacks}",
            seconds=self.seconds,
            stacks=stacks(),
        )
        sys.stdout.flush()
        sys.stderr.flush()
        self._exit(1)
