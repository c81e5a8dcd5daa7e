"""The ServerApp's part of the deployment fast path (the SuperNode's is deploy/fast_node.py).

A SuperNode pushes a reply's metadata before its objects, so the ServerApp's pull
(`HttpGrid.pull_messages`) often comes between the two and then waits Flower's initial
backoff of 1 s before it asks for the objects again. On a SuperLink that
`deploy.launch --fast` started (it sets FAST_SERVER_ENV), the ServerApp asks again after
2 ms instead. This patches one function argument inside Flower, so it is guarded by the
Flower version it was read from.
"""

from __future__ import annotations

import functools
import os
from importlib.metadata import PackageNotFoundError, version

SUPPORTED_FLOWER = "1.41.0"
# Set in the SuperLink's environment by deploy.launch --fast; its ServerApps inherit it.
FAST_SERVER_ENV = "FEDSEMCOM_FAST_NODE"
# Retries of an object pull that found the object not there yet: Flower waits 1 s,
# doubling up to 10 s; the objects of a message follow it within milliseconds.
FAST_PULL_BACKOFF = {"initial_backoff": 0.002, "backoff_cap": 0.05}


def installed_flower_version() -> str:
    try:
        return version("flwr")
    except PackageNotFoundError:
        return "none"


def shorten_reply_pulls() -> bool:
    """Retry a reply's objects after 2 ms instead of 1 s, when the SuperLink was started
    for the fast path. Returns whether it applied (never on another Flower than
    SUPPORTED_FLOWER, and not unless asked)."""
    if os.environ.get(FAST_SERVER_ENV) != "1" or installed_flower_version() != SUPPORTED_FLOWER:
        return False
    from flwr.superlink.grid import http_grid

    if not isinstance(http_grid.pull_objects, functools.partial):
        http_grid.pull_objects = functools.partial(http_grid.pull_objects, **FAST_PULL_BACKOFF)
    return True
