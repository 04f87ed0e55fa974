"""What turns the project's errors into a command's exit: library code raises
:class:`~hypertransport_core.errors.HyperTransportError` (never ``SystemExit``, which would stop a ComfyUI
prompt worker that runs the same code for Fit Steering); only a command's ``main`` becomes an exit status."""

from __future__ import annotations

import functools
from collections.abc import Callable

from hypertransport_core.errors import HyperTransportError


def command(main: Callable[..., int | None]) -> Callable[..., int | None]:
    """Decorate a ``main(argv=None)``: a :class:`HyperTransportError` becomes ``SystemExit`` with its message
    (printed to stderr, exit status 1)."""

    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except HyperTransportError as e:
            raise SystemExit(f"error: {e}") from None

    return run
