"""The simulation engine's dispatch loop with a configurable tick (simulation/dispatch.py):
it must hand out exactly what Flower's loop hands out (one undelivered message per node
per tick, marked delivered by the LinkState), and be in place only during a run."""

import threading
import time
from queue import Queue
from types import SimpleNamespace

import pytest
from flwr.server.superlink.fleet.vce import vce_api

from common.config import ConfigError, load_config
from simulation import dispatch


class FakeLinkState:
    """The two things the loop uses of Flower's InMemoryLinkState: its message store
    (read under its lock) and get_message_ins (which marks messages delivered)."""

    def __init__(self, messages):
        self.lock = threading.RLock()
        self.message_ins_store = {m.id: m for m in messages}
        self.asked: list[int] = []

    def get_message_ins(self, node_id, limit):
        self.asked.append(node_id)
        with self.lock:
            out = [m for m in self.message_ins_store.values()
                   if m.metadata.dst_node_id == node_id and m.metadata.delivered_at == ""]
            for m in out[:limit]:
                m.metadata.delivered_at = "now"
            return out[:limit]


def message(mid, node):
    return SimpleNamespace(id=mid, metadata=SimpleNamespace(dst_node_id=node, delivered_at=""))


def test_the_loop_delivers_one_message_per_node_per_tick_and_asks_only_nodes_with_mail():
    msgs = [message("a1", 2), message("b1", 3), message("a2", 2)]
    state = FakeLinkState(msgs)
    queue, stop = Queue(), threading.Event()
    loop = dispatch._dispatch_loop(0.01)
    thread = threading.Thread(target=loop, args=(state, queue, {1: 0, 2: 1, 3: 2}, stop))
    thread.start()
    got = []
    deadline = time.monotonic() + 10
    while len(got) < 3 and time.monotonic() < deadline:
        got.append(queue.get(timeout=10).id)
    stop.set()
    thread.join(timeout=10)
    assert got[:2] in (["a1", "b1"], ["b1", "a1"]) and got[2] == "a2"  # one per node per tick
    assert all(m.metadata.delivered_at == "now" for m in msgs)
    assert 1 not in state.asked  # node 1 never had mail, so it was never queried
    assert queue.empty()


def test_the_loop_is_flowers_only_outside_a_run_and_with_null():
    flowers = vce_api.add_messages_to_queue
    with dispatch.dispatch_interval(0.002) as active:
        assert active == dispatch.supported()
        assert (vce_api.add_messages_to_queue is not flowers) == active
    assert vce_api.add_messages_to_queue is flowers
    with dispatch.dispatch_interval(None) as active:
        assert not active and vce_api.add_messages_to_queue is flowers


def test_flowers_loop_is_kept_on_another_flower_version(monkeypatch, caplog):
    monkeypatch.setattr(dispatch.flwr, "__version__", "9.9.9")
    flowers = vce_api.add_messages_to_queue
    with dispatch.dispatch_interval(0.005) as active:
        assert not active and vce_api.add_messages_to_queue is flowers
    assert "9.9.9" in caplog.text and "0.1 s" in caplog.text


@pytest.mark.parametrize("override,key", [
    ("simulation.dispatch_interval_s=0", "simulation.dispatch_interval_s"),
    ("simulation.ray_address=not an address", "simulation.ray_address"),
])
def test_bad_simulation_values_name_their_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config("configs/quickstart.yaml", [override])
