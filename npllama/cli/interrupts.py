"""Ctrl-C that is never lost.

Python runs a signal's handler between two bytecodes of the main thread, wherever it is; when that
is inside a weakref callback or a __del__, the KeyboardInterrupt it raises is dropped (printed as
"Exception ignored in ..." with a traceback) and the program goes on as if no key was pressed.
torch runs such callbacks all through a training step, so npllama train would sometimes not stop.
The commands therefore also remember the press and look at it between steps.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading


class Presses:
    """Whether Ctrl-C was pressed since the last clear() (a chat goes on after a stopped answer)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> bool:
        return self.count > 0

    def clear(self) -> None:
        self.count = 0


NEVER = Presses()    # where no handler is set: never pressed


@contextlib.contextmanager
def ctrl_c_remembered():
    """While open, Ctrl-C raises KeyboardInterrupt as usual and is also remembered: yields the
    Presses, which the loops look at between steps (parity.train.train's ``interrupted``, the
    token loops of generate and chat) for a press whose exception Python dropped; that press
    prints no "Exception ignored" traceback. Outside the main thread, where handlers cannot be
    set, and where SIGINT is ignored (a background job), nothing is remembered."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield NEVER
        return
    pressed = Presses()

    def remember(signum, frame):
        pressed.count += 1
        raise KeyboardInterrupt

    def quiet_when_remembered(unraisable):       # the dropped press: remembered, so not a traceback
        if not (pressed() and isinstance(unraisable.exc_value, KeyboardInterrupt)):
            hook(unraisable)
    old, hook = signal.signal(signal.SIGINT, remember), sys.unraisablehook
    sys.unraisablehook = quiet_when_remembered
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, old)
        sys.unraisablehook = hook


def stop_if(pressed: Presses) -> None:
    """Raise the KeyboardInterrupt of a press whose own exception was dropped."""
    if pressed():
        raise KeyboardInterrupt
