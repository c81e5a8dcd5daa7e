"""How often the simulation engine hands queued messages to the virtual clients.

Flower's simulation runtime moves the server's messages to the client actors in one
loop (`flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue`, flwr 1.41.0):
every 0.1 s, a constant, it asks the in-memory LinkState for one message per node,
node by node. A message therefore waits 50 ms on average before a client sees it;
a split step, two round trips, waits about 0.1 s, as long as the whole step of
end-to-end training at batch 64 on a CPU.

`dispatch_interval(s)` runs the same loop with another interval for the duration of a
simulation. Each tick first finds the nodes that have an undelivered message (one pass
over the stored messages), then takes them through the LinkState's own
`get_message_ins`, which marks them delivered as Flower's loop does: so a short
interval stays cheap with a thousand nodes, where Flower's loop queries every node on
every tick. Only the timing changes; which messages reach which node, and in what
order for a node, does not.

This replaces a function inside Flower, so it is guarded by the exact Flower version it
was read from; on another version the runtime keeps Flower's own loop and the log says
so. Upstream, a configurable interval (or a wake-up on push) would make it unnecessary.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from queue import Queue

import flwr

log = logging.getLogger("fedsemcom")

FLOWER_VERSION = "1.41.0"  # the vce_api.add_messages_to_queue this module replaces
FLOWER_INTERVAL_S = 0.1  # its hard-coded tick


def _pending_nodes(state, nodes_mapping) -> list[int]:
    """Nodes with a message not yet delivered, in the order they were stored (every
    node, as Flower asks them, for a LinkState that is not the in-memory one)."""
    if not hasattr(state, "message_ins_store"):
        return list(nodes_mapping)
    nodes: dict[int, None] = {}
    with state.lock:  # the LinkState's own lock: the ServerApp thread stores concurrently
        for msg in state.message_ins_store.values():
            if msg.metadata.delivered_at == "":
                nodes.setdefault(msg.metadata.dst_node_id, None)
    return list(nodes)


def _dispatch_loop(interval_s: float):
    def add_messages_to_queue(state, queue: Queue, nodes_mapping, f_stop: threading.Event):
        """Flower's loop (one message per node per tick, marked delivered by the
        LinkState), ticking every `interval_s` and asking only nodes with mail."""
        while not f_stop.is_set():
            for node_id in _pending_nodes(state, nodes_mapping):
                if node_id in nodes_mapping:
                    for msg in state.get_message_ins(node_id=node_id, limit=1):
                        queue.put(msg)
            f_stop.wait(interval_s)

    return add_messages_to_queue


def supported() -> bool:
    return flwr.__version__ == FLOWER_VERSION


@contextlib.contextmanager
def dispatch_interval(interval_s: float | None) -> Iterator[bool]:
    """Within the block, the simulation engine dispatches every `interval_s` seconds;
    yields whether it does (None, or another Flower version: Flower's own loop)."""
    if interval_s is None:
        yield False
        return
    if not supported():
        log.warning("simulation.dispatch_interval_s=%g needs flwr %s (found %s); keeping "
                    "Flower's own %g s dispatch tick", interval_s, FLOWER_VERSION,
                    flwr.__version__, FLOWER_INTERVAL_S)
        yield False
        return
    from flwr.server.superlink.fleet.vce import vce_api

    original = vce_api.add_messages_to_queue
    vce_api.add_messages_to_queue = _dispatch_loop(interval_s)
    try:
        yield True
    finally:
        vce_api.add_messages_to_queue = original
