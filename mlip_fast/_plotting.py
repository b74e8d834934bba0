"""Plots are optional: without matplotlib (``pip install 'mlip_fast[plots]'``) runs and evaluations write their
JSON records and skip the PNGs, saying so once."""
from __future__ import annotations

import functools
import importlib.util
import logging

logger = logging.getLogger("mlip_fast")
_warned = False


def plots_available() -> bool:
    """Whether matplotlib can be imported; warns once (logger ``mlip_fast``) when it cannot."""
    global _warned
    if importlib.util.find_spec("matplotlib") is not None:
        return True
    if not _warned:
        _warned = True
        logger.warning("matplotlib is not installed: no PNG plots are written (pip install 'mlip_fast[plots]')")
    return False


def optional_plot(fn):
    """Decorates a function that draws and saves a PNG: without matplotlib it returns None instead."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs) if plots_available() else None

    return wrapper
