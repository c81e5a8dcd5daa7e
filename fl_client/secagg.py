"""The client side of SecAgg+ rounds (fl_server/secagg.py): Flower's `secaggplus_mod`
around the ordinary train handler.

Flower's mod speaks the legacy API: its four stages arrive as train messages with a
"secaggplus_configs" record, and in the stage that trains it hands on FitIns records and
expects FitRes records back. `secagg_if_asked` runs it only for such messages; the
adapter between them turns FitIns into the message our handler reads ("arrays",
"config") and the handler's reply into FitRes, so the handler, its checks
(fl_client.trust) and what it keeps on the node are the same as in a plain round. The
mod masks the reply's arrays and clears them: the update itself never leaves.
"""

from __future__ import annotations

import json

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import (
    Code,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from fl_client.trust import Refused

ARRAY_KEYS = "secagg-array-keys"  # as fl_server/secagg.py sends it


def secagg_if_asked(msg: Message, context: Context, call_next) -> Message:
    """Client mod: Flower's secaggplus_mod for SecAgg+ stage messages; others pass."""
    if not msg.has_content() or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)

    def as_plain_round(stage_msg: Message, ctx: Context) -> Message:
        return _as_fit(stage_msg, ctx, call_next)

    return secaggplus_mod(msg, context, as_plain_round)


def _as_fit(msg: Message, context: Context, call_next) -> Message:
    """FitIns in -> our train message -> the handler -> FitRes out."""
    try:
        fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
        config = dict(fitins.config)
        keys = json.loads(str(config.pop(ARRAY_KEYS)))
        values = parameters_to_ndarrays(fitins.parameters)
    except (KeyError, TypeError, ValueError) as err:
        raise Refused(f"a SecAgg+ training stage without valid FitIns ({err})") from None
    if not isinstance(keys, list) or len(keys) != len(values) or len(set(keys)) != len(keys):
        raise Refused(f"{ARRAY_KEYS} names {keys!r:.80} for {len(values)} arrays")
    msg.content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in zip(keys, values)}),
                              "config": ConfigRecord(config)})
    reply = call_next(msg, context)
    if reply.has_error():
        raise Refused(f"training failed: {reply.error.reason}")
    arrays, metrics = reply.content["arrays"], reply.content["metrics"]
    if list(arrays.keys()) != keys:  # the mask is added in this order
        arrays = ArrayRecord({k: arrays[k] for k in keys})
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(
        [a.numpy() for a in arrays.values()]), int(metrics["num-examples"]), dict(metrics))
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)
