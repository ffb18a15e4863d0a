"""SIGTERM / SIGINT: finish the current step, save, exit 0. A second SIGINT aborts at once."""

import logging
import os
import signal

_log = logging.getLogger(__name__)


class PreemptionGuard:
  """While active, the first SIGTERM or SIGINT only sets `requested`; the loop saves and stops."""

  def __init__(self):
    self.requested: str | None = None
    self._previous = {}

  def __enter__(self) -> "PreemptionGuard":
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame) -> None:
    name = signal.Signals(signum).name
    if self.requested is not None and signum == signal.SIGINT:
      _log.warning("second SIGINT: aborting without saving")
      logging.shutdown()
      os._exit(130)
    self.requested = name
    _log.warning("%s received: finishing the current step, then saving a checkpoint and exiting", name)
