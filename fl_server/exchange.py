"""Send messages to SuperNodes and collect the replies, polling often.

Flower's `Grid.send_and_receive` on the deployment engine pulls replies every 3 s
(a constant in flwr 1.41), which adds up to 3 s to every exchange. Split training
exchanges many small messages per round, so this is the same loop over the Grid's
public `push_messages` / `pull_messages` with a configurable poll interval.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

POLL_S = 0.1


def send_and_receive(grid: Grid, messages: Iterable[Message], timeout: float,
                     poll_s: float = POLL_S) -> tuple[list[Message], dict[str, int]]:
    """Push `messages`; return the replies that arrive within `timeout` seconds and
    the node each pushed message went to, by message id (a reply's
    `reply_to_message_id`: replies the SuperLink writes, such as "Node Unavailable",
    come from the SuperLink's own node id)."""
    messages = list(messages)
    if not hasattr(grid, "push_messages"):  # a test double that only delivers
        return list(grid.send_and_receive(messages, timeout=timeout)), {}
    ids = list(grid.push_messages(messages))
    sent_to = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages)}
    pending = set(ids)
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while pending:
        got = list(grid.pull_messages(pending))
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(poll_s)
    return replies, sent_to


def canonical_order(replies: Iterable[Message]) -> list[Message]:
    """The replies sorted by their content, so that an aggregate (a float sum) depends
    on the set of replies and not on the order they arrived in.

    Replies arrive in a different order from run to run (the clients run concurrently,
    and Flower draws node ids anew per run); floating-point sums in another order
    differ in the last bits, which a resumed or repeated run would otherwise show."""

    def key(msg: Message) -> bytes:
        if msg.has_error() or not msg.has_content():
            return b""
        digest = hashlib.blake2b(digest_size=16)
        for name, record in sorted(msg.content.array_records.items()):
            for k, array in record.items():
                digest.update(f"{name}/{k}".encode())
                digest.update(array.data)
        for name, record in sorted(msg.content.metric_records.items()):
            digest.update(repr(sorted(record.items())).encode())
        return digest.digest()

    return sorted(replies, key=key)
