"""The client side of U-shaped split training (LAM-MTSC federated split fine-tuning).

One step, as Flower messages (the server drives; see fl_server/split_loop.py):

  train.split_begin     adapters in           -> activations of step 0 out
  train.split_output    server output in      -> gradient w.r.t. it out; task decoders step
  train.split_backward  gradient w.r.t. the   -> client half steps; then the next step's
                        activations in           activations out, or after the last step
                                                 the client half's adapters and metrics
  evaluate.split_forward  adapters in         -> activations of the local test split out
  evaluate.split_score    server output in    -> task metrics out

Labels, inputs and task decoders never leave: the loss is computed here. The live state
of a round (client-half and task-decoder parameters, both AdamW states, the step
counter, running sums) sits in `context.state`, on the node, after every message: that
copy is the one that counts.

A process that serves consecutive messages of the same node keeps more (a `LiveSlot`):
the parameters stay in the built model, both AdamW optimisers stay alive, and the
autograd graph of the forward whose activations went out is kept, so `split_backward`
backpropagates through it. Without the slot (another process or node ran in between,
the process is new) the handler rebuilds all of it from `context.state` and recomputes
the forward from the same batch and the same seeded channel noise, which reproduces
exactly what it sent; both paths give the same parameters.
"""

from __future__ import annotations

import functools
import json
import math
import uuid
import weakref
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from torch.utils.data import Dataset, default_collate

from common.config import ExperimentConfig, config_from_dict
from common.data import num_classes
from common.device import resolve_device
from common.seeding import round_seed
from fl_client import trust
from fl_client.node import (
    PRIVATE_STATE,
    load_saved_state,
    partition,
    record_data_indices,
    save_state_file,
    saved_state_file,
)
from models import get_split_workload
from models.jscc import sent_positions
from models.seam import SplitWorkload
from models.split_wire import (
    EVAL_UPLINK,
    GRADIENT_NOISE,
    LABEL_DP,
    UPLINK,
    batch_plan,
    encode,
    pack_symbols,
    step_generator,
)
from privacy.split_defences import gaussian_gradient_noise, randomized_response

LIVE_STATE = "split-live"  # parameters and AdamW moments while a round is in progress
PROGRESS = "split-progress"


# --------------------------------------------------------------------------- state


@functools.lru_cache(maxsize=2)
def _skeleton(experiment_json: str, device: str):
    """The built model for a config, kept per process: building it costs more than a
    step. Every message overwrites all client parameters from the node's state."""
    cfg = config_from_dict(json.loads(experiment_json))
    workload = get_split_workload(cfg.workload)
    model = workload.build(cfg, device)
    initial = {n: p.detach().clone() for n, p in workload.client_parameters(model).items()}
    return model, initial


# The server half's output shape per example, by config: what incoming outputs must have.
_OUTPUT_SHAPES: dict[str, tuple[int, ...]] = {}


@dataclass
class LiveSlot:
    """A node's split round as this process left it after the node's last message.

    Valid for the next message only if that message is for the same node of the same
    run (`key` = (context.run_id, context.node_id)) and the node's `context.state` is
    the one this process wrote (its PROGRESS "live-token" equals `token`; every save
    draws a new one, so a message that another process served in between invalidates
    the slot). While valid, the model holds the node's parameters, `optimisers` are
    its two AdamW optimisers and `graph` is (step, packed symbols, counts) of the
    forward whose activations the node sent last. `context.state` keeps the full live
    state all the same: the slot is never the only copy."""

    key: tuple[int, int]
    token: str
    optimisers: list[torch.optim.Optimizer]
    graph: tuple[int, torch.Tensor, torch.Tensor] | None


# One slot per built model: the model is shared by every node this process serves, so
# whichever handler loads parameters into it takes (pops) the slot.
_SLOTS: weakref.WeakKeyDictionary[torch.nn.Module, LiveSlot] = weakref.WeakKeyDictionary()


class ClientHalf:
    """The node's split-training state for one message: model, optimisers, progress.

    Between the messages of a round the parameters and both AdamW states travel in
    `context.state` as a few flat vectors (LIVE_STATE): hundreds of small arrays cost
    more to (de)serialise than the step. At the end of the round the parameters go to
    the node's PRIVATE_STATE by name, as in federated training."""

    def __init__(self, msg: Message, context: Context, resume: bool = True):
        # The experiment with the node's own paths and device (fl_client.trust).
        self.cfg: ExperimentConfig = trust.node_experiment(msg, context)
        self.workload: SplitWorkload = get_split_workload(self.cfg.workload)
        self.context = context
        self.pid, self.num_partitions = partition(context)
        self.device = resolve_device(self.cfg.device)
        self.model, initial = _skeleton(self.cfg.to_json(), str(self.device))
        self.params = self.workload.client_parameters(self.model)
        self.key = (int(context.run_id), int(context.node_id))
        live = context.state.array_records.get(LIVE_STATE) if resume else None
        self.progress = context.state.config_records.get(PROGRESS, ConfigRecord())
        slot = _SLOTS.pop(self.model, None)
        self.slot = slot if (live is not None and slot is not None and slot.key == self.key
                             and slot.token == self.progress.get("live-token")) else None
        if self.slot is None:
            with torch.no_grad():
                if live is not None:
                    for p, value in zip(self.params.values(), self._split(live["params"])):
                        p.copy_(value)
                else:
                    saved = self._saved(msg)
                    for name, p in self.params.items():
                        p.copy_(torch.from_numpy(saved[name]) if name in saved
                                else initial[name])
        self.live = live
        self._opts: list[torch.optim.Optimizer] = []
        self.graph = self.slot.graph if self.slot is not None else None

    def _saved(self, msg: Message) -> dict[str, np.ndarray]:
        """The parameters this node kept after its last round: in `context.state`, or
        in the first message of a resumed run (fresh context) on the node's disk."""
        if PRIVATE_STATE in self.context.state.array_records:
            return {k: v.numpy() for k, v in self.context.state[PRIVATE_STATE].items()}
        return load_saved_state(msg, self.context, self.cfg, self.pid) or {}

    def _split(self, arr: Array) -> list[torch.Tensor]:
        flat = torch.from_numpy(arr.numpy()).to(self.device)
        sizes = [p.numel() for p in self.params.values()]
        return [c.view_as(p) for c, p in zip(flat.split(sizes), self.params.values())]

    # -- training state of the round in progress

    def shared_arrays(self, msg: Message) -> dict[str, np.ndarray]:
        """The client-half adapters of `msg`, checked against this node's."""
        return trust.global_arrays(self.workload, self.model, self.cfg, msg,
                                   client_half_only=True)

    def in_progress(self, msg: Message) -> None:
        """Refuse a step message without a round in progress, past the round's last
        step, or for another round than the one in progress."""
        p = self.progress
        if "step" not in p:
            raise trust.Refused(f"{msg.metadata.message_type} without a split round in "
                                "progress (train.split_begin opens one)")
        if int(p["step"]) >= int(p["steps"]):
            raise trust.Refused(f"{msg.metadata.message_type} after the round's last step "
                                f"({p['steps']})")
        rnd = trust.server_round(msg)
        if "server-round" in msg.content["config"] and rnd != int(p["round"]):
            raise trust.Refused(f"server-round={rnd} but round {p['round']} is in progress")

    def server_output(self, msg: Message, examples: int) -> torch.Tensor:
        """The server half's output for `examples` examples, checked (fl_client.trust)."""
        shape = (examples, *self.output_shape())
        return trust.split_tensors(msg, "output", {"output": shape},
                                   {"output": self.cfg.split.compression})["output"]

    def output_shape(self) -> tuple[int, ...]:
        """The skeleton's own forward of one local example (in eval mode: nothing it
        keeps changes), once per config and process; it follows from the config alone."""
        key = self.cfg.to_json()
        if key not in _OUTPUT_SHAPES:
            train_ds, _ = self.data()
            batch = _to(default_collate([train_ds[0]]), self.device)
            was_training = self.model.training
            self.model.eval()
            with torch.no_grad():
                h, _ = self.model(batch, generator=torch.Generator().manual_seed(0))
            self.model.train(was_training)
            _OUTPUT_SHAPES[key] = tuple(h.shape[1:])
        return _OUTPUT_SHAPES[key]

    def start_round(self, msg: Message) -> None:
        arrays = self.shared_arrays(msg)
        self.workload.load_shared_state(self.model, arrays)
        train_ds, _ = self.data()
        steps = self.cfg.split.steps_per_round or self.cfg.train.local_epochs * math.ceil(
            len(train_ds) / self.cfg.train.batch_size)
        rnd = trust.server_round(msg)
        self.progress = ConfigRecord({
            "round": rnd, "step": 0, "steps": steps, "lora-train": trust.lora_train(msg),
            "loss": 0.0, "symbols": 0.0, "seen": 0,
            **{f"loss_{t}": 0.0 for t in self.cfg.model.tasks},
        })
        self.live = None  # a fresh AdamW every round, as in federated training

    def optimisers(self) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
        """AdamW for the client half and for the task decoders (AdamW is per parameter,
        so two optimisers step exactly as one would)."""
        if self.slot is not None and self.slot.optimisers:  # alive since the last message
            self._opts = self.slot.optimisers
            return self._opts[0], self._opts[1]
        self.workload.set_trainable(self.model, str(self.progress["lora-train"]))
        t = self.cfg.train
        self._opts = []
        for prefix in ("transmitter.", "task_decoders."):
            ps = [p for n, p in self.params.items() if n.startswith(prefix) and p.requires_grad]
            self._opts.append(torch.optim.AdamW(ps, lr=t.lr, weight_decay=t.weight_decay))
        if self.live is not None:
            steps = self.live["steps"].numpy()
            moments = zip(self._split(self.live["exp_avg"]), self._split(self.live["exp_avg_sq"]))
            by_id = {id(p): (int(n), m, v) for p, n, (m, v) in
                     zip(self.params.values(), steps, moments)}
            for opt in self._opts:
                for p in opt.param_groups[0]["params"]:
                    n, m, v = by_id[id(p)]
                    if n > 0:
                        opt.state[p] = {"step": torch.tensor(float(n)), "exp_avg": m.clone(),
                                        "exp_avg_sq": v.clone()}
        return self._opts[0], self._opts[1]

    def save(self, msg: Message, end_of_round: bool = False) -> None:
        state = self.context.state
        token = uuid.uuid4().hex
        self.progress["live-token"] = token
        state[PROGRESS] = self.progress
        if end_of_round:
            params = {n: p.detach().cpu().numpy().copy() for n, p in self.params.items()}
            state[PRIVATE_STATE] = ArrayRecord({n: Array(a) for n, a in params.items()})
            state.array_records.pop(LIVE_STATE, None)
            # On the node's disk too (node config `state-dir`), so that a resumed run
            # (a new Flower run, empty contexts) continues from this round.
            save_state_file(params, saved_state_file(self.cfg, msg, self.context, self.pid,
                                                     int(self.progress["round"])))
            return
        per_param = {id(p): st for opt in self._opts for p, st in opt.state.items()}
        st = [per_param.get(id(p)) for p in self.params.values()]  # None: not stepped yet

        def flat(key: str) -> np.ndarray:
            return torch.cat([s[key].reshape(-1).cpu() if s else torch.zeros(p.numel())
                              for s, p in zip(st, self.params.values())]).numpy()

        moments = {"exp_avg": flat("exp_avg"), "exp_avg_sq": flat("exp_avg_sq"),
                   "steps": np.array([int(s["step"]) if s else 0 for s in st], np.int64)}
        params = torch.cat([p.detach().reshape(-1).cpu() for p in self.params.values()])
        state[LIVE_STATE] = ArrayRecord({"params": Array(params.numpy()),
                                         **{k: Array(np.ascontiguousarray(v))
                                            for k, v in moments.items()}})
        _SLOTS[self.model] = LiveSlot(self.key, token, self._opts, self.graph)

    # -- data and the client half's forward

    def data(self) -> tuple[Dataset, Dataset]:
        return self.workload.load_data(self.cfg, self.pid, self.num_partitions)

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        train_ds, _ = self.data()
        seed = round_seed(self.cfg.seed, int(self.progress["round"]), self.pid)
        idx = batch_plan(len(train_ds), self.cfg.train.batch_size, step + 1, seed)[step]
        batch = default_collate([train_ds[int(i)] for i in idx])
        eps = self.cfg.privacy.split_defence.label_epsilon
        if eps is not None:  # label DP: train on the node's randomized-response labels
            batch["label"] = _private_labels(self.cfg.seed, self.pid, eps,
                                             num_classes(self.cfg.data), train_ds)[idx]
        return _to(batch, self.device)

    def generator(self, step: int, key: int = UPLINK) -> torch.Generator:
        return step_generator(self.cfg.seed, self.pid, int(self.progress["round"]), step, key)

    def activations(self, step: int) -> Message | RecordDict:
        """Forward of step `step`: what goes on the air after the uplink channel. Its
        graph is kept for the step's backward (LiveSlot), with the trainable set the
        backward will use."""
        self.workload.set_trainable(self.model, str(self.progress["lora-train"]))
        tx, received, snr_db = self.model.uplink(self.batch(step), generator=self.generator(step))
        sent = sent_positions(tx.counts, received.shape[-1])
        self.graph = (step, pack_symbols(received, sent), tx.counts)
        self.progress["symbols"] = float(self.progress["symbols"]) + tx.symbols_sent.sum().item()
        return RecordDict({
            "activations": activation_record(tx.counts, received, snr_db,
                                             self.cfg.split.compression),
            "split": ConfigRecord({"partition-id": self.pid, "num-partitions": self.num_partitions,
                                   "step": step, "steps": int(self.progress["steps"])}),
        })


def activation_record(counts, received, snr_db, codec: str) -> ArrayRecord:
    """Uplink payload: sent symbols (packed, compressed), soft counts and SNR (fp32)."""
    sent = sent_positions(counts, received.shape[-1])
    return ArrayRecord({
        **encode("symbols", pack_symbols(received, sent), codec),
        **encode("counts", counts),
        **encode("snr_db", snr_db),
    })


@functools.lru_cache(maxsize=8)
def _private_labels(seed: int, pid: int, epsilon: float, n_classes: int,
                    train_ds: Dataset) -> torch.Tensor:
    """The partition's training labels after randomized response, drawn once per node
    (a label released twice with fresh noise would spend the budget twice)."""
    gen = step_generator(seed, pid, LABEL_DP)
    return randomized_response(train_ds.tensors["label"], n_classes, epsilon, gen)


def _to(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


# --------------------------------------------------------------------------- handlers


def begin(msg: Message, context: Context) -> Message:
    half = ClientHalf(msg, context, resume=False)  # from the node's private state
    half.start_round(msg)
    record_data_indices(half.cfg, msg, context, half.pid, *half.data())
    content = half.activations(0)
    half.save(msg)
    return Message(content=content, reply_to=msg)


def output(msg: Message, context: Context) -> Message:
    """Server output in: loss with the local labels, task decoders step, gradient out."""
    half = ClientHalf(msg, context)
    half.in_progress(msg)
    step = int(half.progress["step"])
    batch = half.batch(step)
    h = half.server_output(msg, batch["image"].shape[0]).to(half.device).requires_grad_(True)
    _, heads_opt = half.optimisers()
    losses = half.model.task_decoders.losses(h, batch)
    weights = half.cfg.train.loss_weights
    loss = sum(weights.get(t, 1.0) * v for t, v in losses.items())
    heads_opt.zero_grad(set_to_none=True)
    loss.backward()
    heads_opt.step()
    n = batch["image"].shape[0]
    p = half.progress
    p["loss"] = float(p["loss"]) + loss.item() * n
    p["seen"] = int(p["seen"]) + n
    for t, v in losses.items():
        p[f"loss_{t}"] = float(p[f"loss_{t}"]) + v.item() * n
    half.save(msg)
    grad = gaussian_gradient_noise(h.grad, half.cfg.privacy.split_defence.gradient_noise_std,
                                   half.generator(step, GRADIENT_NOISE))
    grads = ArrayRecord(encode("output", grad, half.cfg.split.compression))
    return Message(content=RecordDict({"gradients": grads}), reply_to=msg)


def backward(msg: Message, context: Context) -> Message:
    """Gradient w.r.t. the activations in: recompute the forward, backward, step; then
    the next step's activations, or after the last step the adapters and metrics."""
    half = ClientHalf(msg, context)
    half.in_progress(msg)
    tx_opt, _ = half.optimisers()
    step = int(half.progress["step"])
    kept = half.graph
    if kept is not None and kept[0] == step:  # the graph of the forward that was sent
        _, symbols, counts = kept
    else:  # recompute it: same batch, same seeded noise, same parameters
        tx, received, _ = half.model.uplink(half.batch(step), generator=half.generator(step))
        symbols = pack_symbols(received, sent_positions(tx.counts, received.shape[-1]))
        counts = tx.counts
    grads = trust.split_tensors(
        msg, "gradients", {"symbols": tuple(symbols.shape), "counts": tuple(counts.shape)},
        {"symbols": half.cfg.split.compression, "counts": "none"})
    tx_opt.zero_grad(set_to_none=True)
    torch.autograd.backward(
        [symbols, counts],
        [grads["symbols"].to(half.device), grads["counts"].to(half.device)],
    )
    tx_opt.step()
    half.progress["step"] = step + 1
    if step + 1 < int(half.progress["steps"]):
        content = half.activations(step + 1)
        half.save(msg)
        return Message(content=content, reply_to=msg)
    half.save(msg, end_of_round=True)
    return Message(content=_final_content(half), reply_to=msg)


def _final_content(half: ClientHalf) -> RecordDict:
    p = half.progress
    seen = max(int(p["seen"]), 1)
    metrics = {"train_loss": float(p["loss"]) / seen,
               "symbols_per_example": float(p["symbols"]) / seen,
               "num-examples": len(half.data()[0])}
    metrics.update({f"loss_{t}": float(p[f"loss_{t}"]) / seen for t in half.cfg.model.tasks})
    shared = half.workload.shared_state(half.model, str(p["lora-train"]), client_half_only=True)
    return RecordDict({
        "arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in shared.items()}),
        "metrics": MetricRecord(metrics),
    })


@torch.no_grad()
def eval_forward(msg: Message, context: Context) -> Message:
    """Activations of the whole local test split (seeded: the same draws every time)."""
    half = ClientHalf(msg, context, resume=False)
    half.workload.load_shared_state(half.model, half.shared_arrays(msg))
    half.model.eval()
    _, test_ds = half.data()
    gen = step_generator(half.cfg.seed, half.pid, EVAL_UPLINK)
    parts = []
    for batch in half.workload.eval_batches(test_ds, half.cfg):
        tx, received, snr_db = half.model.uplink(_to(batch, half.device), generator=gen)
        parts.append((tx.counts, received, snr_db))
    counts, received, snr_db = (torch.cat(x) for x in zip(*parts))
    record = activation_record(counts, received, snr_db, half.cfg.split.compression)
    content = RecordDict({"activations": record,
                          "split": ConfigRecord({"partition-id": half.pid})})
    return Message(content=content, reply_to=msg)


@torch.no_grad()
def eval_score(msg: Message, context: Context) -> Message:
    """Server output for the test split in: task metrics with the local heads out."""
    half = ClientHalf(msg, context, resume=False)
    half.model.eval()
    _, test_ds = half.data()
    h = half.server_output(msg, len(test_ds)).to(half.device)
    scorer = half.workload.TaskScorer(half.cfg)
    start = 0
    for batch in half.workload.eval_batches(test_ds, half.cfg):
        n = batch["image"].shape[0]
        scorer.add(half.model.task_decoders, h[start:start + n], _to(batch, half.device))
        start += n
    metrics = scorer.result()
    record = MetricRecord({k: (int(v) if k == "num-examples" else float(v))
                           for k, v in metrics.items()})
    return Message(content=RecordDict({"metrics": record}), reply_to=msg)
