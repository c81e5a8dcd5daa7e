"""LAM-MTSC's first three experiments on the `mtsc` workload ("Multi-Task Semantic
Communications via Large Models", arXiv 2503.22064), scored with the paper's metrics:
BLEU for VQA answers and CIDEr-D for captions (models/mtsc/metrics.py), beside accuracy.

    python -m reports.mtsc_paper [--config configs/mtsc_paper.yaml] [--out DIR]
        [--examples N] [--downlink-mbps R] [key=value ...]

1. trains four federations on Flower's Ray simulation, each the config with the
   overrides of its experiment (`EXPERIMENTS`; key=value applies to all four), a
   completed run in --out reused:
   - vqa_fixed: VQA only, fixed compression (every token sends all of its
     model.jscc_symbols at every SNR: model.min_rate=1), AWGN, trained over 0..10 dB;
   - rate_on / rate_off: VQA and captioning over AWGN at -2..2 dB. On: the
     importance-aware variable rate (a budget of 16 symbols a token at -2 dB falling to
     8 at 2 dB, split across tokens by learned importance); off: every token sends the
     same number of symbols at every SNR, the mean that "on" sent per token where it was
     scored (`off_symbols`; trained after "on"), so both use the channel alike;
   - placement: captioning under federated split fine-tuning (split.mode=parallel);
2. restores every client as it ended its run (reports/runs.py) and scores the union of
   the clients' test splits (the first --examples of each) as one corpus, so CIDEr's IDF
   is that of the whole test set: vqa_fixed at 0, 6 and 10 dB, rate_on / rate_off at
   -2, -1, 0, 1 and 2 dB (and the channel symbols each sent per example);
3. placement: the same trained task decoder on the client (the server's output crosses
   the split.downlink channel and the wire codec, the client generates the caption) or
   on the server (the server generates it from its own output and sends the words), at
   10 dB on the uplink: CIDEr-D and BLEU-4, and the latency per example, measured (one
   thread, median of repeats): each party's compute, plus the downlink's bytes at
   --downlink-mbps. The task decoder is trained on the client in both (the split loop
   trains it where the labels are); on the server it reads an output the downlink
   did not touch;
4. writes report.json and report.png and prints a Markdown table.

The data are the synthetic scenes (common/data/scenes.py), not the paper's COCO and
VQAv2, and the LAM is a small BART built from a config with random weights, not a
pre-trained one: the numbers are this workload's, not the paper's.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from rich.progress import Progress
from torch import Tensor
from torch.utils.data import default_collate

from common.config import ExperimentConfig, load_config, need
from common.seeding import seeded
from models.channel import WirelessChannel, analog_transmission
from models.mtsc import workload as mtsc
from models.mtsc.metrics import TaskScorer
from models.mtsc.model import Q_CAP
from models.split_wire import decode, encode, record_bytes
from reports.cli import (
    finish_report,
    median_ms,
    report_config,
    report_folder,
    report_parser,
)
from reports.runs import restore_client, simulation_run

RATE_SNRS = [-2.0, 2.0]  # the low-SNR range of the rate ablation (dB)
ON_SYMBOLS, ON_MIN_RATE = 16, 0.5  # rate on: a budget of 16 symbols a token at -2 dB, 8 at 2
EXPERIMENTS: dict[str, list[str]] = {
    "vqa_fixed": ["model.tasks=[vqa]", "model.min_rate=1", "channel.model=awgn",
                  "channel.snr_range_db=[0,10]", "split.mode='off'"],
    "rate_on": ["model.tasks=[vqa,captioning]", f"model.jscc_symbols={ON_SYMBOLS}",
                f"model.min_rate={ON_MIN_RATE}", f"model.rate_snr_db={RATE_SNRS}",
                "channel.model=awgn", f"channel.snr_range_db={RATE_SNRS}", "split.mode='off'"],
    # + model.jscc_symbols: what "on" sends per token on average (`off_symbols`)
    "rate_off": ["model.tasks=[vqa,captioning]", "model.min_rate=1", "channel.model=awgn",
                 f"channel.snr_range_db={RATE_SNRS}", "split.mode='off'"],
    "placement": ["model.tasks=[captioning]", "split.mode=parallel"],
}
EVAL_SNRS = {"vqa_fixed": [0.0, 6.0, 10.0], "rate_on": [-2.0, -1.0, 0.0, 1.0, 2.0],
             "rate_off": [-2.0, -1.0, 0.0, 1.0, 2.0]}
PLACEMENT_SNR_DB = 10.0  # the uplink's SNR in the placement experiment
LATENCY_BATCH, LATENCY_REPEATS = 32, 20
TOKEN_BYTES = 2  # a caption word id on the downlink (uint16 holds any vocabulary here)
# The paper's headline numbers (Sec. V, on COCO / VQAv2 with a pre-trained BART).
PAPER = {"vqa_bleu": 0.70, "cider": 0.90}


def off_symbols(on_points: list[dict[str, Any]]) -> int:
    """Symbols per token for "rate off": the mean that "on" sent per token over the SNRs
    it was scored at, so both use the channel alike. (On does not spend its whole budget:
    tokens its learned importance would give more than model.jscc_symbols are capped.)"""
    per_token = [p["symbols_per_example"] / p["tokens_per_example"] for p in on_points]
    return max(1, round(sum(per_token) / len(per_token)))


def experiment_overrides(args, name: str, extra: list[str] = ()) -> list[str]:
    return [*args.overrides, *EXPERIMENTS[name], *extra]


def _test_batches(cfg: ExperimentConfig, pid: int, examples: int | None):
    _, test = mtsc.load_data(cfg, pid, cfg.num_clients)
    n = len(test) if examples is None else min(examples, len(test))
    step = mtsc.eval_batches(test, cfg).batch_size
    return [default_collate([test[i] for i in range(s, min(s + step, n))])
            for s in range(0, n, step)]


def _clients(cfg: ExperimentConfig, run_dir: Path):
    for pid in range(cfg.num_clients):
        yield pid, restore_client(cfg, run_dir, pid)


@torch.no_grad()
def snr_points(cfg: ExperimentConfig, run_dir: Path, snrs: list[float],
               examples: int | None) -> list[dict[str, Any]]:
    """The task metrics of every client's model on its test examples at each fixed SNR,
    the union scored as one corpus, and the channel symbols sent per example."""
    scorers = {snr: TaskScorer(cfg) for snr in snrs}
    symbols, tokens = {snr: 0.0 for snr in snrs}, 0
    for pid, model in _clients(cfg, run_dir):
        batches = _test_batches(cfg, pid, examples)
        for snr in snrs:
            with seeded(cfg.seed + pid):  # the same noise draws for every run at this SNR
                for batch in batches:
                    h, tx = model(batch, torch.full((len(batch["image"]),), snr))
                    scorers[snr].add(model.task_decoders, h, batch)
                    symbols[snr] += tx.symbols_sent.sum().item()
                    tokens = tx.counts.shape[1]
    points = []
    for snr in snrs:
        m = scorers[snr].result()
        points.append({"snr_db": snr, "examples": m["num-examples"],
                       "symbols_per_example": symbols[snr] / m["num-examples"],
                       "tokens_per_example": tokens,
                       **{k: m[k] for k in mtsc.EVAL_METRICS if k in m}})
    return points


def load_server_half(model, run_dir: Path) -> None:
    """The trained server half of a split run (server_half.npz) into `model.receiver`."""
    saved = np.load(Path(run_dir) / "server_half.npz")
    params = dict(model.receiver.named_parameters())
    with torch.no_grad():
        for name in saved.files:
            params[name].copy_(torch.from_numpy(saved[name]))




class _Placement:
    """The receiver's end of the split with the caption decoder on the client or on the
    server: what reaches the decoder, and the downlink's payload per example."""

    def __init__(self, cfg: ExperimentConfig, model):
        self.cfg, self.model = cfg, model
        self.downlink = WirelessChannel(cfg.split.downlink)

    def server_output(self, received: Tensor, mask: Tensor, snr: Tensor) -> Tensor:
        return self.model.receiver(received, mask, snr)

    def downlink_channel(self, h: Tensor, generator: torch.Generator) -> Tensor:
        """The server output as the split.downlink channel delivers it (the channel
        itself, which no party computes)."""
        snr_down = self.downlink.sample_snr_db(h.shape[0], h.device, generator)
        return analog_transmission(h, self.downlink, snr_down, generator)

    def wire(self, h: Tensor) -> tuple[Tensor, int]:
        """The server's encoding and the client's decoding of its output with the split's
        codec (as fl_server/split_loop.py's ServerHalf.forward sends it), and its bytes."""
        record = ArrayRecord(encode("output", h, self.cfg.split.compression))
        return decode(record, "output"), record_bytes(record)

    def caption(self, h: Tensor) -> Tensor:
        return self.model.task_decoders.captioning.generate(h[:, Q_CAP], self.cfg.model.caption_len)


@torch.no_grad()
def placement(cfg: ExperimentConfig, run_dir: Path, examples: int | None,
              downlink_mbps: float) -> dict[str, Any]:
    """Captioning with the task decoder on the client vs. on the server: scores over the
    union of the test splits, and measured latency per example on one thread."""
    scorers = {"client": TaskScorer(cfg), "server": TaskScorer(cfg)}
    down_bytes = {"client": 0, "server": 0}
    latency_case = None
    for pid, model in _clients(cfg, run_dir):
        load_server_half(model, run_dir)
        end = _Placement(cfg, model)
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + pid)
        with seeded(cfg.seed + pid):
            for batch in _test_batches(cfg, pid, examples):
                snr = torch.full((len(batch["image"]),), PLACEMENT_SNR_DB)
                tx, received, _ = model.uplink(batch, snr)
                h = end.server_output(received, tx.mask, snr)
                scorers["server"].add(model.task_decoders, h, batch)
                down_bytes["server"] += h.shape[0] * cfg.model.caption_len * TOKEN_BYTES
                at_client, n_bytes = end.wire(end.downlink_channel(h, gen))
                scorers["client"].add(model.task_decoders, at_client, batch)
                down_bytes["client"] += n_bytes
                if latency_case is None:
                    latency_case = (end, {k: v[:LATENCY_BATCH] for k, v in batch.items()})
    latency = _placement_latency(*latency_case)
    out: dict[str, Any] = {"uplink_snr_db": PLACEMENT_SNR_DB,
                           "downlink": {"model": cfg.split.downlink.model,
                                        "snr_db": cfg.split.downlink.snr_db,
                                        "compression": cfg.split.compression},
                           "downlink_mbps": downlink_mbps}
    for where, scorer in scorers.items():
        m = scorer.result()
        per_example = down_bytes[where] / m["num-examples"]
        transfer_ms = per_example * 8 / (downlink_mbps * 1e6) * 1e3
        lat = latency[where]
        out[where] = {"examples": m["num-examples"], "cider": m["cider"], "bleu": m["bleu"],
                      "downlink_bytes_per_example": per_example,
                      "server_ms_per_example": lat["server"],
                      "client_ms_per_example": lat["client"],
                      "transfer_ms_per_example": transfer_ms,
                      "latency_ms_per_example": lat["server"] + lat["client"] + transfer_ms}
    return out


def _placement_latency(end: _Placement, batch: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    """Milliseconds per example of each party's compute from the received symbols to the
    caption (one thread, median of LATENCY_REPEATS): the server half, the wire codec of
    its output (counted on the client's side), the caption decoder wherever it runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        n = len(batch["image"])
        snr = torch.full((n,), PLACEMENT_SNR_DB)
        tx, received, _ = end.model.uplink(batch, snr)
        h = end.server_output(received, tx.mask, snr)
        noisy = end.downlink_channel(h, torch.Generator().manual_seed(0))
        at_client, _ = end.wire(noisy)

        def ms(fn) -> float:
            return median_ms(fn, LATENCY_REPEATS) / n

        receiver = ms(lambda: end.server_output(received, tx.mask, snr))
        codec = ms(lambda: end.wire(noisy))  # the server's encoding, the client's decoding
        return {"client": {"server": receiver, "client": codec + ms(lambda: end.caption(at_client))},
                "server": {"server": receiver + ms(lambda: end.caption(h)), "client": 0.0}}
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- output

def markdown_table(report: dict[str, Any]) -> str:
    lines = ["| experiment | setting | SNR (dB) | VQA accuracy | VQA BLEU-1 | caption CIDEr-D "
             "| caption BLEU-4 | channel symbols / example |", "|---" * 8 + "|"]

    def cell(p: dict, key: str) -> str:
        return f"{p[key]:.3f}" if key in p else "-"

    for name, setting in (("vqa_fixed", "VQA only, fixed rate"),
                          ("rate_on", "importance-aware rate on"),
                          ("rate_off", f"rate adaptation off "
                                       f"({report['rate_off']['jscc_symbols']} a token)")):
        for p in report[name]["points"]:
            lines.append(f"| {name} | {setting} | {p['snr_db']:g} | {cell(p, 'vqa_accuracy')} | "
                         f"{cell(p, 'vqa_bleu')} | {cell(p, 'cider')} | {cell(p, 'bleu')} | "
                         f"{p['symbols_per_example']:.0f} |")
    pl = report["placement"]
    lines += ["", f"task decoder placement (captioning, uplink {pl['uplink_snr_db']:g} dB, "
              f"downlink {pl['downlink']['model']} {pl['downlink']['snr_db']:g} dB, "
              f"{pl['downlink']['compression']}; transfer at {pl['downlink_mbps']:g} Mbit/s):", "",
              "| task decoder on | CIDEr-D | BLEU-4 | server ms / ex. | client ms / ex. | "
              "downlink bytes / ex. | transfer ms / ex. | latency ms / ex. |", "|---" * 8 + "|"]
    for where in ("client", "server"):
        p = pl[where]
        lines.append(f"| {where} | {p['cider']:.3f} | {p['bleu']:.3f} | "
                     f"{p['server_ms_per_example']:.3f} | {p['client_ms_per_example']:.3f} | "
                     f"{p['downlink_bytes_per_example']:.0f} | "
                     f"{p['transfer_ms_per_example']:.3f} | {p['latency_ms_per_example']:.3f} |")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    ax = axes[0]
    pts = report["vqa_fixed"]["points"]
    snrs = [p["snr_db"] for p in pts]
    ax.plot(snrs, [p["vqa_accuracy"] for p in pts], "o-", label="VQA accuracy")
    ax.plot(snrs, [p["vqa_bleu"] for p in pts], "s--",
            label="VQA BLEU-1 (the accuracy on one-word answers)")
    ax.axhline(PAPER["vqa_bleu"], color="grey", ls=":", label="paper's BLEU (real data)")
    ax.set(xlabel="SNR (dB)", ylabel="score", ylim=(0, 1),
           title="1. VQA only, fixed rate, AWGN")
    ax.legend(fontsize=8)
    for ax, key, label in ((axes[1], "vqa_bleu", "VQA BLEU-1"),
                           (axes[2], "cider", "caption CIDEr-D")):
        for name, style in (("rate_on", "o-"), ("rate_off", "s--")):
            pts = report[name]["points"]
            ax.plot([p["snr_db"] for p in pts], [p[key] for p in pts], style,
                    label=f"{name.replace('_', ' ')} "
                          f"({pts[0]['symbols_per_example']:.0f}-{pts[-1]['symbols_per_example']:.0f} "
                          "symbols / ex.)")
        ax.axhline(PAPER[key], color="grey", ls=":", label="paper (real data)")
        ax.set(xlabel="SNR (dB)", ylabel=label, title=f"2. importance-aware rate: {label}")
        ax.legend(fontsize=8)
    ax = axes[3]
    pl = report["placement"]
    for where, marker in (("client", "o"), ("server", "s")):
        p = pl[where]
        ax.scatter(p["latency_ms_per_example"], p["cider"], marker=marker, s=60,
                   label=f"task decoder on the {where} "
                         f"({p['downlink_bytes_per_example']:.0f} B down / ex.)")
    ax.set(xlabel=f"latency per example (ms; downlink at {pl['downlink_mbps']:g} Mbit/s)",
           ylabel="caption CIDEr-D", title="3. task decoder placement (captioning)")
    ax.set_ylim(0, 1.15 * max(pl[w]["cider"] for w in ("client", "server")))
    ax.legend(fontsize=8)
    for a in axes:
        a.grid(alpha=0.3)
    fig.suptitle("LAM-MTSC's first experiments on synthetic scenes (not the paper's data)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = report_parser("mtsc_paper", __doc__, "configs/mtsc_paper.yaml")
    parser.add_argument("--examples", type=int, default=None,
                        help="test examples per client to score (default: all)")
    parser.add_argument("--downlink-mbps", type=float, default=1.0,
                        help="the downlink rate the placement's transfer time assumes")
    args = parser.parse_args(argv)

    def check(cfg: ExperimentConfig) -> None:
        need(cfg.workload == "mtsc", "workload", cfg.workload, "'mtsc' for this report")
        need(args.examples is None or args.examples >= 1, "--examples", args.examples, ">= 1")
        need(args.downlink_mbps > 0, "--downlink-mbps", args.downlink_mbps, "> 0")

    cfg = report_config(args, check)
    out = report_folder(args, cfg, "mtsc_paper")
    runs = {name: experiment_overrides(args, name) for name in EXPERIMENTS if name != "rate_off"}
    for name, overrides in runs.items():
        simulation_run(args.config, overrides, out / name)
    report: dict[str, Any] = {"config": cfg.to_dict(), "data": cfg.data.name, "paper": PAPER}
    with Progress() as progress:
        bar = progress.add_task("scoring", total=len(EXPERIMENTS))
        for name in ("vqa_fixed", "rate_on"):
            report[name] = {"points": snr_points(load_config(args.config, runs[name]), out / name,
                                                 EVAL_SNRS[name], args.examples)}
            progress.advance(bar)
        k = off_symbols(report["rate_on"]["points"])
        runs["rate_off"] = experiment_overrides(args, "rate_off", [f"model.jscc_symbols={k}"])
        progress.stop()  # the run prints its own progress
        off_dir = out / f"rate_off_{k}"  # named by its rate: a run at another is not reused
        simulation_run(args.config, runs["rate_off"], off_dir)
        progress.start()
        report["rate_off"] = {"jscc_symbols": k, "points": snr_points(
            load_config(args.config, runs["rate_off"]), off_dir, EVAL_SNRS["rate_off"],
            args.examples)}
        progress.advance(bar)
        report["placement"] = placement(load_config(args.config, runs["placement"]),
                                        out / "placement", args.examples, args.downlink_mbps)
        progress.advance(bar)
    report["overrides"] = runs
    finish_report(cfg, out, report, plot, markdown_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
