"""Downloading weights without hanging an offline machine: a socket timeout, silence, one error line.

Shared by torchvision's weights (:mod:`freezetune.models.weights`) and timm's
(:mod:`freezetune.models.timm_models`); it imports nothing but the error types, so it sits in
layer 1 with the timm module, below config.
"""

from __future__ import annotations

import contextlib
import io
import socket

from freezetune.errors import WeightsError, first_line


def download_within(fetch, timeout: float | None, quiet: bool, what: str, how: str):
    """Runs ``fetch(progress)`` with a socket timeout, silenced when ``quiet``; any failure is one WeightsError.

    Args:
        fetch: Downloads and returns the weights; takes whether to show progress.
        timeout: Socket timeout in seconds (None: the default).
        quiet: Hide what the downloader prints (torch.hub prints before it knows the network works).
        what: What is downloaded, for the message.
        how: What the user can do instead, for the message.
    """
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        with _silenced() if quiet else contextlib.nullcontext():
            return fetch(not quiet)
    except Exception as e:  # network errors come in many types (URLError, socket, http, hub errors)
        raise WeightsError(f"cannot download {what} ({first_line(e)}); {how}") from None
    finally:
        socket.setdefaulttimeout(old)


@contextlib.contextmanager
def _silenced():
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield

