"""torch's and ExecuTorch's own messages, held back while ``fedfleet export`` traces and lowers a model.

A trace that fails (a user's loss reading a number out of a tensor, an op a runtime lacks) makes torch
log the graph it was tracing, warn about its own internals and ExecuTorch's C++ runtime print missing
operators: tens of lines on stderr above the one line that says what failed. ``held_back`` keeps them
from the terminal: Python warnings and torch's loggers are silenced, and whatever still reaches file
descriptor 2 (the C++ runtimes write there directly) goes to a temporary file. If the block raises (a
fault of fedfleet's, not a model an exporter cannot take), what was held back is written out before
the traceback, which stays as it is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator

LOGGERS = ("torch", "executorch", "onnxscript", "torch_xla", "torchao")


@contextlib.contextmanager
def held_back() -> Iterator[None]:
    """Hold back stderr, torch's logging and Python warnings inside the block (module docstring)."""
    loggers = [logging.getLogger(name) for name in LOGGERS]
    levels = [logger.level for logger in loggers]
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            _restore(saved, loggers, levels)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            sys.stderr.flush()
            raise
        finally:
            _restore(saved, loggers, levels)
            os.close(saved)


def _restore(saved: int, loggers: list[logging.Logger], levels: list[int]) -> None:
    sys.stderr.flush()
    os.dup2(saved, 2)
    for logger, level in zip(loggers, levels, strict=True):
        logger.setLevel(level)
