"""Secure aggregation of a federated training round with Flower's SecAgg+.

With `strategy.secure_aggregation: true` the server never sees a client's update: each
client quantises its weighted update, adds pairwise masks (agreed with its neighbours)
and a private mask, and sends only that; the server sums the masked vectors, collects
the key shares that remove the masks of the sum, and obtains the weighted mean, which
equals FedAvg's up to the quantisation error.

Flower 1.41 ships SecAgg+ for its legacy API only: `SecAggPlusWorkflow` drives a legacy
`Strategy` (configure_fit / aggregate_fit) through a `LegacyContext`, and the client's
`secaggplus_mod` expects FitIns / FitRes records. So one round here is: our Message-API
strategy picks the nodes and the train config (`configure_train`), a legacy strategy
hands exactly those to the workflow, the workflow runs its four stages over our Grid,
and the unmasked mean becomes the new global arrays. The client side is
fl_client/secagg.py.

What the server gives up: it cannot check a single update (reply_checks.py sees none),
so only strategies whose aggregate is a weighted mean can run this way, and a client's
values are clipped to +-SECAGG_CLIPPING_RANGE before quantisation.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import FitIns, Parameters, parameters_to_ndarrays
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from common.config import ExperimentConfig

# The config entry that names the arrays of the FitIns parameters (a legacy Parameters
# object is an unnamed list): a JSON list of keys, in order.
ARRAY_KEYS = "secagg-array-keys"
SECAGG_CLIPPING_RANGE = 8.0  # Flower's default: LoRA factors and student weights stay well inside
SECAGG_QUANTIZATION_RANGE = 2**22  # Flower's default


class _Node(ClientProxy):
    """A node as the legacy workflow names it; it only ever reads `node_id`."""

    def __init__(self, node_id: int):
        super().__init__(str(node_id))
        self.node_id = node_id

    def get_properties(self, *args, **kwargs):
        raise NotImplementedError

    get_parameters = fit = evaluate = reconnect = get_properties


class _OneRound(Strategy):
    """The legacy strategy of one SecAgg+ round: the nodes and train configs our
    strategy chose, and the unmasked mean as the aggregate."""

    def __init__(self, messages: list[Message], keys: list[str]):
        self.messages, self.keys = messages, keys
        self.results: list = []
        self.failures: list = []

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager):
        return [(_Node(m.metadata.dst_node_id),
                 FitIns(parameters, {**dict(m.content["config"]),
                                     ARRAY_KEYS: json.dumps(self.keys)}))
                for m in self.messages]

    def aggregate_fit(self, server_round, results, failures):
        # The workflow sets every result's parameters to the unmasked mean.
        self.results, self.failures = list(results), list(failures)
        return (results[0][1].parameters if results else None), {}

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class _MeteredGrid:
    """The Grid, counting what each exchange of the protocol moves and how long it takes."""

    def __init__(self, grid: Grid):
        self.grid, self.bytes_up, self.bytes_down, self.exchanges = grid, 0, 0, 0
        self.replies: list[Message] = []  # everything the clients sent (for the tests)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.bytes_down += sum(_payload(m) for m in messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.bytes_up += sum(_payload(r) for r in replies)
        self.replies += replies
        self.exchanges += 1
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)


def _payload(msg: Message) -> int:
    """Bytes of a message's arrays and of the byte strings of its config records (where
    SecAgg+ keeps keys, shares and masked vectors)."""
    if not msg.has_content():
        return 0
    total = sum(len(a.data) for r in msg.content.array_records.values() for a in r.values())
    for record in msg.content.config_records.values():
        for value in record.values():
            for v in value if isinstance(value, list) else [value]:
                total += len(v) if isinstance(v, bytes) else 0
    return total


def secure_train_round(grid: Grid, strategy, cfg: ExperimentConfig, rnd: int,
                       arrays: ArrayRecord, config: ConfigRecord
                       ) -> tuple[ArrayRecord | None, MetricRecord | None, int, list[Message]]:
    """One training round under SecAgg+: (new arrays or None, train metrics, clients
    that took part, every message the clients sent)."""
    messages = list(strategy.configure_train(rnd, arrays, config, grid))
    keys = list(arrays.keys())
    one = _OneRound(messages, keys)
    state = RecordDict({MAIN_PARAMS_RECORD: arrays,
                        MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: rnd})})
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=state,
                                    run_config={}), strategy=one)
    metered = _MeteredGrid(grid)
    # No client holds more examples than the experiment has: the largest weight.
    workflow = SecAggPlusWorkflow(
        num_shares=1.0, reconstruction_threshold=0.67, max_weight=float(cfg.data.num_samples),
        clipping_range=SECAGG_CLIPPING_RANGE, quantization_range=SECAGG_QUANTIZATION_RANGE,
        timeout=cfg.round_timeout_s)
    t0 = time.perf_counter()
    if len(messages) >= cfg.min_train_clients:
        workflow(metered, context)
    seconds = time.perf_counter() - t0
    if not one.results or len(one.results) < cfg.min_train_clients:
        return None, None, len(one.results), metered.replies
    mean = parameters_to_ndarrays(one.results[0][1].parameters)
    new = ArrayRecord({k: Array(np.ascontiguousarray(v.astype(arrays[k].numpy().dtype)))
                       for k, v in zip(keys, mean)})
    return new, _metrics(one, arrays, metered, seconds), len(one.results), metered.replies


def _metrics(one: _OneRound, arrays: ArrayRecord, metered: _MeteredGrid,
             seconds: float) -> MetricRecord:
    """The clients' metrics weighted by examples (they travel in the clear), the
    round's traffic and the protocol's cost."""
    fitres = [res for _, res in one.results]
    weights = np.array([r.num_examples for r in fitres], dtype=np.float64)
    common = set.intersection(*(set(r.metrics) for r in fitres))
    out = {k: float(np.dot(weights, [float(r.metrics[k]) for r in fitres]) / weights.sum())
           for k in sorted(common) if k != "num-examples"}
    eps = [float(r.metrics["dp_epsilon"]) for r in fitres if "dp_epsilon" in r.metrics]
    if eps:
        out.update(dp_epsilon_max=max(eps), dp_epsilon_mean=sum(eps) / len(eps))
    n = len(fitres)
    out.update({
        "bytes_up": metered.bytes_up / n,  # every stage: keys, shares, masked vector
        "bytes_down": metered.bytes_down / n,
        "clients_accepted": n, "clients_rejected": len(one.failures),
        "secagg_seconds": seconds, "secagg_exchanges": metered.exchanges,
    })
    return MetricRecord(out)


