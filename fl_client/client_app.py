"""The ClientApp: Flower message handlers around a workload.

The experiment config arrives from the server with every message (one source of
truth, the same on the simulation and the deployment engine), except what touches the
node's disk, network or device: those keys come from the SuperNode's node config
(`device`, `data-root`, `data-download`, `state-dir`, `model-checkpoint`,
`teacher-checkpoint`, `teacher-store-dir`, `diffusion-checkpoint`,
`diffusion-clip-checkpoint`, `knowledge-base`, `knowledge-embedder`,
`transmitter-budget`; see
fl_client/trust.py), beside `partition-id` and `num-partitions`. Every message is checked before a handler acts on
it, and one that fails gets an error reply naming the value. The client's trainable
tensors persist between rounds in `context.state`, which stays on the node; the
server's shared state is loaded on top of them. So what is private (task decoders,
modality encoders, the JSCC) is simply whatever the workload's `shared_state` does not
send.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from common.config import ExperimentConfig
from common.device import resolve_device
from common.seeding import round_seed
from fl_client import model_cache, split_handlers, trust
from fl_client.node import (
    PRIVATE_STATE,
    load_saved_state,
    partition,
    record_data_indices,
    save_state_file,
    saved_state_file,
)
from fl_client.secagg import secagg_if_asked
from models import get_workload
from models.client_state import (
    client_experiment,
    client_lora_rank,
    load_local_parameters,
    local_parameters,
)
from privacy.central_dp import UNIFORM_WEIGHT, clip_if_asked
from privacy.dp import HISTORY_KEY, BudgetExhausted, ClientDP

log = logging.getLogger("fedsemcom")
# The error code of a reply from a client that declines to train (its DP budget).
BUDGET_EXHAUSTED = 4001


def _setup(msg: Message, context: Context):
    cfg = trust.node_experiment(msg, context)  # with the node's own paths and device
    pid, n = partition(context)
    cfg = client_experiment(cfg, pid)  # with its own transmitter budget (mtsc compression)
    device = resolve_device(cfg.device)
    workload = get_workload(cfg.workload)
    rank = client_lora_rank(cfg, pid)
    # Built once per process and reset here (fl_client/model_cache.py); the caller
    # gives it back when its message is done. DP-SGD's Opacus hooks rule it out.
    model = model_cache.checkout(
        model_cache.model_key(cfg.to_json(), rank, device),
        lambda: workload.build(cfg, device, lora_rank=rank),
        enabled=cfg.simulation.reuse_models and cfg.privacy.dp.mode != "local")
    try:
        arrays = trust.global_arrays(workload, model, cfg, msg)  # before anything is loaded
        if PRIVATE_STATE in context.state.array_records:
            saved = {k: v.numpy()
                     for k, v in context.state.array_records[PRIVATE_STATE].items()}
        else:
            saved = load_saved_state(msg, context, cfg, pid)
        dp_history = None if saved is None else saved.pop(HISTORY_KEY, None)
        if saved is not None:
            load_local_parameters(model, saved)
        workload.load_shared_state(model, arrays)  # the global state wins over the local copy
        train_ds, test_ds = workload.load_data(cfg, pid, n)
    except BaseException:
        model_cache.checkin(model)
        raise
    return cfg, pid, workload, model, train_ds, test_ds, dp_history


def _save_private(model: torch.nn.Module, msg: Message, context: Context,
                  cfg: ExperimentConfig, pid: int, server_round: int,
                  extra: dict[str, np.ndarray] | None = None) -> None:
    """The node's private tensors (and `extra`, e.g. its DP accountant) after a round."""
    params = {n: p.detach().cpu().numpy() for n, p in local_parameters(model).items()}
    params.update(extra or {})
    context.state[PRIVATE_STATE] = ArrayRecord({n: Array(a) for n, a in params.items()})
    save_state_file(params, saved_state_file(cfg, msg, context, pid, server_round))


def _metric_record(metrics: dict[str, float]) -> MetricRecord:
    # MetricRecord wants plain Python numbers.
    return MetricRecord({k: (int(v) if k == "num-examples" else float(v)) for k, v in metrics.items()})


def train(msg: Message, context: Context) -> Message:
    cfg, pid, workload, model, train_ds, test_ds, dp_history = _setup(msg, context)
    try:
        return _train(msg, context, cfg, pid, workload, model, train_ds, test_ds, dp_history)
    finally:
        model_cache.checkin(model)


def _train(msg: Message, context: Context, cfg: ExperimentConfig, pid: int, workload,
           model: torch.nn.Module, train_ds, test_ds, dp_history) -> Message:
    lora_train = trust.lora_train(msg)
    server_round = trust.server_round(msg)
    seed = round_seed(cfg.seed, server_round, pid)
    dp = None
    if cfg.privacy.dp.mode == "local":  # DP-SGD, continuing this node's accountant
        dp = ClientDP(cfg.privacy.dp, cfg.rounds, cfg.train.local_epochs, dp_history)
    try:
        metrics = workload.train_local(model, train_ds, cfg, lora_train=lora_train, seed=seed,
                                       make_private=dp.make_private if dp else None)
    except BudgetExhausted as err:
        log.warning("partition %d, round %d: %s", pid, server_round, err)
        return Message(error=Error(code=BUDGET_EXHAUSTED, reason=f"privacy budget: {err}"),
                       reply_to=msg)
    if cfg.privacy.dp.mode == "central":  # the accounted DP mean weighs clients equally
        metrics[UNIFORM_WEIGHT] = 1
    extra = None
    if dp is not None:
        metrics.update(dp_epsilon=dp.epsilon(), dp_noise_multiplier=dp.noise_multiplier)
        extra = {HISTORY_KEY: dp.history()}
    _save_private(model, msg, context, cfg, pid, server_round, extra)
    record_data_indices(cfg, msg, context, pid, train_ds, test_ds)
    shared = workload.shared_state(model, lora_train)
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in shared.items()}),
        "metrics": _metric_record(metrics),
    })
    return Message(content=content, reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    cfg, _, workload, model, _, test_ds, _ = _setup(msg, context)
    try:
        metrics = workload.evaluate(model, test_ds, cfg)
    finally:
        model_cache.checkin(model)
    if cfg.privacy.dp.mode == "central":  # the strategy averages by it (see train)
        metrics[UNIFORM_WEIGHT] = 1
    return Message(content=RecordDict({"metrics": _metric_record(metrics)}), reply_to=msg)


class NodeApp(ClientApp):
    """A ClientApp that answers every message it will not act on with an error reply
    (code trust.REFUSED, the reason naming the value) instead of raising, and one that
    fails with Flower's CLIENT_APP_RAISED_EXCEPTION (as Flower's runtime would on a
    SuperNode), so that the node keeps serving in any engine; `node_defaults` fill in
    node config keys the node lacks (the simulation engine, whose virtual nodes have no
    node config of their own)."""

    def __init__(self, mods: list | None = None, node_defaults: dict | None = None):
        super().__init__(mods=mods)
        self.node_defaults = dict(node_defaults or {})
        self.message_types: set[str] = set()

    def __call__(self, message: Message, context: Context) -> Message:
        for key, value in self.node_defaults.items():
            context.node_config.setdefault(key, value)
        kind = message.metadata.message_type
        try:
            if kind not in self.message_types:
                raise trust.Refused(f"unknown message type {kind!r}; this node answers "
                                    f"{', '.join(sorted(self.message_types))}")
            return super().__call__(message, context)
        except trust.Refused as err:
            log.warning("refused a %r message: %s", kind, err)
            return Message(error=Error(code=trust.REFUSED, reason=f"refused: {err}"),
                           reply_to=message)
        except Exception as err:  # noqa: BLE001 - as Flower's runtime answers it, in process too
            log.exception("a %r message failed", kind)
            reason = f"{type(err).__name__}: {err}"[:500]
            return Message(error=Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                           reply_to=message)


HANDLERS = {
    "train": train,
    "evaluate": evaluate,
    # U-shaped split training (fl_client/split_handlers.py).
    "train.split_begin": split_handlers.begin,
    "train.split_output": split_handlers.output,
    "train.split_backward": split_handlers.backward,
    "evaluate.split_forward": split_handlers.eval_forward,
    "evaluate.split_score": split_handlers.eval_score,
}


def make_app(mods: list | None = None, node_defaults: dict | None = None) -> NodeApp:
    """The ClientApp with every handler; `mods` wrap each call (Flower client mods)."""
    client = NodeApp(mods=mods or [], node_defaults=node_defaults)
    for kind, handler in HANDLERS.items():
        category, _, action = kind.partition(".")
        # Every message is screened (fl_client.trust) before any other mod reads it;
        # central DP with client-side clipping adds Flower's fixedclipping_mod to train.
        # SecAgg+ stage messages go to Flower's secaggplus_mod first (fl_client.secagg).
        handler_mods = [trust.screen] + ([clip_if_asked] if kind == "train" else [])
        if kind == "train":
            handler_mods.insert(0, secagg_if_asked)
        getattr(client, category)(action or "default", mods=handler_mods)(handler)
        client.message_types.add(kind)
    return client


app = make_app()
