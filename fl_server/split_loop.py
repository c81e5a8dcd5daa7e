"""The server side of U-shaped split training (LAM-MTSC federated split fine-tuning).

The server holds the server half (the JSCC decoder and the LAM decoder with LoRA); the
clients hold everything else and their labels (fl_client/split_handlers.py). One step for one
client is two round trips:

    server -> client  train.split_output    the server half's output (after the downlink)
    client -> server                        gradient w.r.t. that output
                      (server half backward and AdamW step)
    server -> client  train.split_backward  gradient w.r.t. the activations
    client -> server                        the next step's activations, or at the end
                                            the client half's adapters and metrics

`split.mode: sequential`: one server half, the round's clients take turns (split
learning). `parallel`: a server-half copy per client, all clients step together and the
copies are averaged by examples at the end of the round (SplitFed). In both modes the
client-half adapters go to the configured Flower strategy at the end of the round. A
client that does not answer within `split.client_timeout_s` is dropped for the round
(the log names it) and the others go on.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from common.config import ExperimentConfig
from common.data import num_classes
from common.device import resolve_device
from common.records import new_run_dir
from common.seeding import round_seed
from fl_server.checkpoint import save_checkpoint
from fl_server.exchange import send_and_receive
from fl_server.loop import (
    make_strategy,
    recorder,
    round_row,
    round_summary,
    start_or_resume,
    strategy_state,
)
from models import get_split_workload
from models.channel import WirelessChannel, analog_transmission
from models.jscc import sent_positions
from models.split_wire import (
    DOWNLINK,
    EVAL_DOWNLINK,
    batch_plan,
    decode,
    encode,
    record_bytes,
    step_generator,
    unpack_symbols,
)
from privacy.label_leakage import PANELS as LEAKAGE_PANELS
from privacy.label_leakage import LabelLeakageProbe

log = logging.getLogger("fedsemcom")



class ServerHalf:
    """One copy of the server half with its AdamW; keeps the graph of the step in flight."""

    def __init__(self, module: torch.nn.Module, cfg: ExperimentConfig, workload):
        self.module, self.cfg, self.workload = module, cfg, workload
        self.device = next(module.parameters()).device
        self.downlink = WirelessChannel(cfg.split.downlink)
        self.opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad],
                                     lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        self._graph: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def state_records(self) -> dict[str, ArrayRecord]:
        """For the checkpoint: the trainable parameters by name, and the AdamW state as
        torch's optimizer state_dict keys it ("<parameter index>.<exp_avg|...>")."""
        params = {n: Array(p.detach().cpu().numpy().copy())
                  for n, p in self.module.named_parameters() if p.requires_grad}
        moments = {f"{i}.{key}": Array(v.detach().cpu().numpy().copy())
                   for i, st in self.opt.state_dict()["state"].items() for key, v in st.items()}
        return {"server_half": ArrayRecord(params), "server_optimizer": ArrayRecord(moments)}

    def load_state_records(self, records: dict[str, ArrayRecord]) -> None:
        """Inverse of state_records (the checkpoint of a run being resumed)."""
        params = dict(self.module.named_parameters())
        with torch.no_grad():
            for name, value in records["server_half"].items():
                params[name].copy_(torch.from_numpy(value.numpy()))
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in records["server_optimizer"].items():
            i, name = key.split(".", 1)
            state.setdefault(int(i), {})[name] = torch.from_numpy(value.numpy())
        self.opt.load_state_dict({"state": state,
                                  "param_groups": self.opt.state_dict()["param_groups"]})

    def forward(self, acts: ArrayRecord, generator: torch.Generator,
                train: bool = True) -> ArrayRecord:
        """Activations in -> the output as it reaches the client (downlink applied)."""
        values = decode(acts, "symbols").to(self.device).requires_grad_(train)
        counts = decode(acts, "counts").to(self.device).requires_grad_(train)
        snr_db = decode(acts, "snr_db").to(self.device)
        received = unpack_symbols(values, sent_positions(counts, self.cfg.model.jscc_symbols))
        self.module.train(train)
        with torch.set_grad_enabled(train):
            h = self.workload.server_forward(self.module, received, counts, snr_db)
            snr_down = self.downlink.sample_snr_db(h.shape[0], self.device, generator)
            h = analog_transmission(h, self.downlink, snr_down, generator)
        self._graph = (values, counts, h) if train else None
        return ArrayRecord(encode("output", h, self.cfg.split.compression))

    def backward(self, grads: ArrayRecord) -> ArrayRecord:
        """Gradient w.r.t. the output in: step; gradient w.r.t. the activations out."""
        if self._graph is None:
            raise RuntimeError("ServerHalf.backward without a forward in flight")
        values, counts, h = self._graph
        self._graph = None
        self.opt.zero_grad(set_to_none=True)
        h.backward(decode(grads, "output").to(self.device))
        self.opt.step()
        return ArrayRecord({**encode("symbols", values.grad, self.cfg.split.compression),
                            **encode("counts", counts.grad)})


@dataclass
class Session:
    """One client's part of a round: its server half and what crossed the wire."""

    node_id: int
    half: ServerHalf
    partition_id: int = -1
    num_partitions: int = 0
    step: int = 0
    reply: Message | None = None
    bytes_up: int = 0  # every tensor of the round, adapters included
    bytes_down: int = 0
    step_bytes_up: int = 0  # activations and gradients only
    step_bytes_down: int = 0
    step_seconds: float = 0.0  # wall time of its steps, server compute included
    done: Message | None = None
    dropped: str | None = None
    messages: list[float] = field(default_factory=list)


def _exchange(grid: Grid, sessions: list[Session], build, message_type: str,
              cfg: ExperimentConfig, timeout: float | None = None) -> None:
    """Send one message per live session and wait (at most the timeout: by default
    `split.client_timeout_s`) for replies; a session whose client errs or stays silent
    is dropped with a logged reason."""
    timeout = timeout or cfg.split.client_timeout_s
    out = []
    for s in sessions:
        content = build(s)
        for name, record in content.array_records.items():
            s.bytes_down += record_bytes(record)
            s.step_bytes_down += record_bytes(record) if name != "arrays" else 0
        out.append(Message(content, dst_node_id=s.node_id, message_type=message_type))
    t0 = time.perf_counter()
    got, sent_to = send_and_receive(grid, out, timeout, poll_s=cfg.split.poll_interval_s)
    # By the node the message went to (an error the SuperLink writes for a node it
    # lost comes from the SuperLink's own id).
    replies = {sent_to.get(m.metadata.reply_to_message_id, m.metadata.src_node_id): m
               for m in got}
    elapsed = time.perf_counter() - t0
    for s in sessions:
        reply = replies.get(s.node_id)
        who = f"node {s.node_id}" + (f" (partition {s.partition_id})" if s.partition_id >= 0 else "")
        if reply is None:
            s.dropped = f"no answer to {message_type} within {timeout:g} s"
        elif reply.has_error():
            s.dropped = f"{message_type} failed: {reply.error.reason}"
        if s.dropped:
            log.warning("%s dropped from this round: %s", who, s.dropped)
            continue
        s.reply = reply
        s.messages.append(elapsed)
        for name, record in reply.content.array_records.items():
            s.bytes_up += record_bytes(record)
            s.step_bytes_up += record_bytes(record) if name != "arrays" else 0
        if "split" in reply.content.config_records:
            s.partition_id = int(reply.content["split"]["partition-id"])
            s.num_partitions = int(reply.content["split"].get("num-partitions", 0))


def _live(sessions: list[Session]) -> list[Session]:
    return [s for s in sessions if s.dropped is None and s.done is None]


def begin_sessions(grid: Grid, sessions: list[Session], begin: dict[int, RecordDict],
                   cfg: ExperimentConfig) -> list[Session]:
    """Open the round on every client at once (adapters down, step-0 activations up)
    and return the sessions ordered by partition id.

    Step 0's activations depend only on the client's own half and the global adapters,
    so all clients may begin together even in sequential mode. The order by partition
    id makes sequential turns and every weighted sum independent of the node ids,
    which Flower draws at random for each run: a resumed run repeats them exactly."""
    # The first message also loads the data and builds the model: the round's timeout.
    _exchange(grid, sessions, lambda s: begin[s.node_id], "train.split_begin", cfg,
              cfg.round_timeout_s)
    return sorted(sessions, key=lambda s: (s.partition_id, s.node_id))


def train_sessions(grid: Grid, sessions: list[Session], cfg: ExperimentConfig, rnd: int,
                   config: ConfigRecord, on_step=None, on_gradients=None) -> None:
    """Run the begun sessions' split steps to the end of their local plans, in lockstep.
    `on_gradients(session, rnd)` sees each gradient the server receives (an audit)."""
    while live := _live(sessions):
        t0 = time.perf_counter()

        def output(s: Session) -> RecordDict:
            gen = step_generator(cfg.seed, s.partition_id, rnd, s.step, DOWNLINK)
            acts = s.reply.content["activations"]
            return RecordDict({"output": s.half.forward(acts, gen), "config": config})

        _exchange(grid, live, output, "train.split_output", cfg)
        live = _live(sessions)
        for s in live if on_gradients else ():
            on_gradients(s, rnd)
        _exchange(grid, live, lambda s: RecordDict({
            "gradients": s.half.backward(s.reply.content["gradients"]), "config": config,
        }), "train.split_backward", cfg)
        for s in _live(sessions):
            s.step += 1
            s.step_seconds += time.perf_counter() - t0
            if "arrays" in s.reply.content.array_records:
                s.done = s.reply
        if on_step:
            on_step(len(live))


def _auditor_labels(cfg: ExperimentConfig, workload, s: Session, rnd: int) -> torch.Tensor:
    """The labels of the batch behind session `s`'s current step. The audit knows them
    (it reads the client's data and replays its batch plan); no message carries them."""
    train_ds, _ = workload.load_data(cfg, s.partition_id, s.num_partitions)
    plan = batch_plan(len(train_ds), cfg.train.batch_size, s.step + 1,
                      round_seed(cfg.seed, rnd, s.partition_id))
    return train_ds.tensors["label"][plan[s.step]]


def _average_into(target: torch.nn.Module, copies: list[tuple[torch.nn.Module, float]]) -> None:
    """SplitFed: the server-half copies averaged with weights (examples per client)."""
    total = sum(w for _, w in copies)
    params = [dict(m.named_parameters()) for m, _ in copies]
    with torch.no_grad():
        for name, p in target.named_parameters():
            if p.requires_grad:
                p.copy_(sum(w * ps[name] for ps, (_, w) in zip(params, copies)) / total)


def server_half_state(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {n: p.detach().cpu().numpy() for n, p in module.named_parameters() if p.requires_grad}


def run_split(grid: Grid, cfg: ExperimentConfig, run_dir: Path | None = None,
              console: Console | None = None, resume: bool = False) -> dict[str, Any]:
    """`cfg.rounds` rounds of federated split fine-tuning; returns the results dict.

    After every round the encoder adapters, the server half with its AdamW state,
    the strategy state and the metrics are checkpointed in `run_dir`; `resume=True`
    continues from there (the clients continue from their `state-dir`)."""
    console = console or Console(stderr=True)
    run_dir = Path(run_dir) if run_dir else new_run_dir(cfg.output_dir, cfg.name)
    workload = get_split_workload(cfg.workload)
    strategy = make_strategy(cfg)
    model = workload.build(cfg, resolve_device(cfg.device))
    workload.set_trainable(model, strategy.lora_train)
    server = ServerHalf(workload.server_half(model), cfg, workload)
    arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in workload.shared_state(
        model, strategy.lora_train, client_half_only=True).items()})
    done, rows = 0, []
    if ckpt := start_or_resume(run_dir, cfg, resume):
        arrays, done, rows = ckpt.arrays["global"], ckpt.round, ckpt.metrics
        server.load_state_records(ckpt.arrays)
    audit = cfg.privacy.label_leakage
    probe = (LabelLeakageProbe(workload.LABEL_ROW, num_classes(cfg.data), audit.max_examples)
             if audit.audit else None)
    records = recorder(run_dir, cfg, rows, extra_panels=LEAKAGE_PANELS if probe else ())

    def audit_gradients(s: Session, rnd: int) -> None:  # what the server received
        grads = decode(s.reply.content["gradients"], "output")
        probe.observe(s.partition_id, grads, _auditor_labels(cfg, workload, s, rnd))

    on_gradients = audit_gradients if probe is not None else None
    run_key = run_dir.name  # the clients key their saved state by it (fl_client.node)
    resumed = f", resumed after round {done}" if resume else ""
    console.print(f"[bold]fedsemcom[/] {cfg.name}: split training ({cfg.split.mode}), "
                  f"{cfg.rounds} rounds, {cfg.num_clients} clients, strategy "
                  f"{cfg.strategy.name}, results in {run_dir}{resumed}", soft_wrap=True)
    progress = Progress(TextColumn("[bold blue]{task.description}"), BarColumn(),
                        TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                        console=console)
    try:
        with progress:
            rounds_bar = progress.add_task("split rounds", total=cfg.rounds, completed=done)
            for rnd in range(done + 1, cfg.rounds + 1):
                t0 = time.time()
                config = ConfigRecord({"experiment": cfg.to_json(), "run-key": run_key})
                begin_msgs = list(strategy.configure_train(rnd, arrays, config, grid))
                if not begin_msgs:
                    raise RuntimeError(f"round {rnd}: the strategy selected no clients "
                                       f"(min_train_clients={cfg.min_train_clients})")
                step_config = ConfigRecord(dict(begin_msgs[0].content["config"]))
                begin = {m.metadata.dst_node_id: m.content for m in begin_msgs}
                steps_bar = progress.add_task(f"round {rnd} split steps", total=None)

                def on_step(n: int, bar=steps_bar) -> None:
                    progress.advance(bar, n)

                if cfg.split.mode == "sequential":  # one server half, clients take turns
                    sessions = begin_sessions(
                        grid, [Session(node, server) for node in begin], begin, cfg)
                    for s in sessions:
                        train_sessions(grid, [s], cfg, rnd, step_config, on_step, on_gradients)
                else:
                    sessions = begin_sessions(grid, [
                        Session(node, ServerHalf(copy.deepcopy(server.module), cfg, workload))
                        for node in begin], begin, cfg)
                    train_sessions(grid, sessions, cfg, rnd, step_config, on_step,
                                   on_gradients)
                    finished = [(s.half.module, float(s.done.content["metrics"]["num-examples"]))
                                for s in sessions if s.done is not None]
                    if finished:
                        _average_into(server.module, finished)
                progress.remove_task(steps_bar)
                finals = [s.done for s in sessions if s.done is not None]
                new_arrays, train_metrics = strategy.aggregate_train(rnd, finals)
                if new_arrays is not None:
                    arrays = new_arrays
                else:
                    log.warning("round %d: no client finished; keeping the global adapters", rnd)
                eval_metrics = _evaluate(grid, strategy, server, cfg, rnd, arrays, run_key)
                row = round_row(workload, rnd, train_metrics, eval_metrics, len(finals),
                                time.time() - t0)
                row.update(_traffic(sessions))
                if probe is not None:
                    row.update(probe.round_metrics())
                records.add_round(row)
                save_checkpoint(run_dir, rnd, {"global": arrays, **server.state_records()},
                                strategy_state(cfg), records.rounds, cfg.to_dict())
                progress.advance(rounds_bar)
                progress.console.print(round_summary(workload, row, cfg.rounds), soft_wrap=True)
        np.savez(run_dir / "global_adapters.npz", **{k: v.numpy() for k, v in arrays.items()})
        np.savez(run_dir / "server_half.npz", **server_half_state(server.module))
        records.finish("completed")
    except BaseException as err:
        records.finish("failed", error=f"{type(err).__name__}: {err}")
        raise
    return records.data


def _traffic(sessions: list[Session]) -> dict[str, float]:
    """Bytes per client per round (tensors only) and per step (activations and
    gradients), wall seconds per step and per round trip, dropped clients."""
    done = [s for s in sessions if s.done is not None]
    row: dict[str, float] = {"clients_dropped": float(sum(s.dropped is not None for s in sessions))}
    if not done:
        return row
    steps = sum(s.step for s in done)
    row.update({
        "bytes_up": float(np.mean([s.bytes_up for s in done])),
        "bytes_down": float(np.mean([s.bytes_down for s in done])),
        "split_steps": float(steps),
        "bytes_up_per_step": sum(s.step_bytes_up for s in done) / steps,
        "bytes_down_per_step": sum(s.step_bytes_down for s in done) / steps,
        "seconds_per_step": sum(s.step_seconds for s in done) / steps,
        "seconds_per_message": float(np.mean([t for s in done for t in s.messages])),
    })
    return row


def _evaluate(grid: Grid, strategy, server: ServerHalf, cfg: ExperimentConfig, rnd: int,
              arrays: ArrayRecord, run_key: str):
    """Split evaluation: test activations up, the server half's output down, metrics up."""
    if cfg.fraction_evaluate == 0:
        return None
    config = ConfigRecord({"experiment": cfg.to_json(), "run-key": run_key})
    msgs = list(strategy.configure_evaluate(rnd, arrays, config, grid))
    sessions = [Session(m.metadata.dst_node_id, server) for m in msgs]
    content = {m.metadata.dst_node_id: m.content for m in msgs}
    _exchange(grid, sessions, lambda s: content[s.node_id], "evaluate.split_forward", cfg,
              cfg.round_timeout_s)
    sessions.sort(key=lambda s: (s.partition_id, s.node_id))  # as in begin_sessions

    def score(s: Session) -> RecordDict:
        gen = step_generator(cfg.seed, s.partition_id, EVAL_DOWNLINK)
        return RecordDict({"output": server.forward(s.reply.content["activations"], gen,
                                                    train=False), "config": config})

    _exchange(grid, _live(sessions), score, "evaluate.split_score", cfg, cfg.round_timeout_s)
    return strategy.aggregate_evaluate(rnd, [s.reply for s in _live(sessions)])
