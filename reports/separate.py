"""Learned JSCC against the separate source-channel coding baseline, at equal channel
uses: the curves every deep-JSCC paper plots, and the cliff they are meant to beat.

    python -m reports.separate --config configs/quickstart.yaml [--run RUN_DIR]
        [--codecs jpeg webp avif] [--fading rayleigh] [--images 32] [key=value ...]

1. trains the workload on Flower's Ray simulation (or reads the finished run of
   --run, e.g. the run `make demo` wrote);
2. puts each of the first --clients clients back together as it ended the run
   (reports/runs.py) and takes the first --images images of its test split;
3. at every SNR of --snr (default -5 .. 20 dB) over AWGN and the --fading model:
   - learned: the client's own transmitter -> channel -> receiver -> task heads, and
     the complex channel symbols it sent per image;
   - separate, one per codec: the image through models/separate.py (codec at the
     largest quality that fits *the same number of symbols* after LDPC + QAM at the
     MCS of that SNR; a lost or unsent image becomes the client's mean training image)
     -> the same task heads, reading the received image over an error-free semantic
     link;
4. writes report.json (every point; the separate baseline's cliff per codec and
   channel: the lowest SNR from which on at least half its images arrive) and
   report.png (metric vs. SNR, both systems, both channels), and prints a table.

What each workload measures (the same heads score both systems):
- mtsc: classification accuracy; reconstruction PSNR and SSIM (the reconstruction
  head's output for the learned system, the received image for the separate one);
- tosc: classification accuracy;
- taco: the client classifier's accuracy and the received image's PSNR and SSIM.
  TACO's transmitter is digital too: its learned point is each image's LSF payload over
  the same 5G LDPC + QAM link (models/taco/digital_link.py), and images whose context
  block was lost (they show the mean training image) count as "lost";
- diffusion: the receiver's task net on the phase-3 reconstruction (classification
  accuracy, the share of pixels segmented right) and PSNR / SSIM. Its phase-1 map and
  phase-3 edges each cross the same link as one transport block
  (models/diffusion/link.py `DigitalLink`); a lost phase-1 map counts as "lost".
MS-SSIM needs images of at least 176 pixels a side for its five scales, so smaller
images report SSIM and "ms_ssim_3": MS-SSIM over its first three scales with a
7-pixel window (at least 28 pixels a side). LPIPS (torchmetrics, AlexNet) is scored
when torchvision's ImageNet AlexNet weights are already in torch's hub cache; nothing is
downloaded, and without them report.json says where the file would go.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchmetrics.functional.image import (
    multiscale_structural_similarity_index_measure,
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

from common.config import CHANNEL_MODELS, ChannelConfig, ConfigError, ExperimentConfig, need
from common.seeding import seeded
from models import get_workload, separate
from models.channel import WirelessChannel
from reports.cli import (
    finish_report,
    report_config,
    report_folder,
    report_parser,
)
from reports.runs import RunFolderError, finished_run, restore_client, simulation_run

SNRS = [-5.0, -2.5, 0.0, 2.5, 5.0, 7.5, 10.0, 12.5, 15.0, 17.5, 20.0]
WORKLOADS = ("mtsc", "tosc", "taco", "diffusion")
MS_SSIM_MIN_SIZE = 176  # 11 * 2^4: the 11-pixel window still fits at the fifth scale
# Smaller images get MS-SSIM over its first three scales with a 7-pixel window, the
# standard exponents of those scales renormalised to sum to 1 (reported as "ms_ssim_3"):
# 7 * 2^2 = 28 pixels a side at least (torchmetrics checks both sizes).
MS_SSIM_3_BETAS = tuple(b / (0.0448 + 0.2856 + 0.3001) for b in (0.0448, 0.2856, 0.3001))
MS_SSIM_3_MIN_SIZE = 28
LPIPS_MIN_SIZE = 32  # AlexNet's strides and pools leave nothing of a smaller image
NOISELESS = ChannelConfig(model="none")
TOP_SNR_DB = 20.0  # the SNR the semantic link is told when it carries a received image


def lpips_backbone() -> Path:
    """Where torchvision keeps its ImageNet AlexNet weights (LPIPS's backbone)."""
    from torchvision.models import AlexNet_Weights

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(AlexNet_Weights.DEFAULT.url).name


@functools.lru_cache(maxsize=1)
def _lpips() -> torch.nn.Module | None:
    """torchmetrics' LPIPS with the AlexNet backbone (its linear heads ship with
    torchmetrics) when the backbone's weights are already in torch's hub cache, else
    None: nothing is downloaded."""
    if not lpips_backbone().is_file():
        return None
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    return LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True).eval()


def image_quality(images: Tensor, reference: Tensor) -> dict[str, Tensor]:
    """Per-image PSNR (dB) and SSIM, or MS-SSIM where the images are large enough, and
    LPIPS where its backbone's weights are at hand."""
    images, reference = images.clamp(0, 1), reference.clamp(0, 1)
    out = {"psnr": peak_signal_noise_ratio(images, reference, data_range=1.0,
                                           reduction="none", dim=(1, 2, 3))}
    if images.shape[-1] >= MS_SSIM_MIN_SIZE:
        out["ms_ssim"] = multiscale_structural_similarity_index_measure(
            images, reference, data_range=1.0, reduction="none")
    else:
        out["ssim"] = structural_similarity_index_measure(images, reference, data_range=1.0,
                                                          reduction="none")
        if images.shape[-1] >= MS_SSIM_3_MIN_SIZE:
            out["ms_ssim_3"] = multiscale_structural_similarity_index_measure(
                images, reference, data_range=1.0, kernel_size=7, betas=MS_SSIM_3_BETAS,
                reduction="none")
    lpips = _lpips()
    if lpips is not None and images.shape[-1] >= LPIPS_MIN_SIZE:
        out["lpips"] = torch.stack([lpips(a[None].cpu(), b[None].cpu()).detach()
                                    for a, b in zip(images, reference)])
    return out


# ------------------------------------------------------------------ the workloads' two ends
# learned(cfg, model, batch, channel, snr, fallback) -> (per-image metrics, symbols sent
#   per image); `fallback` [3, S, S] is what a receiver shows for an image it lost
# heads(model, images, batch) -> per-image metrics of the task heads on received images

def _mtsc_learned(cfg: ExperimentConfig, model, batch: dict[str, Tensor],
                  channel: ChannelConfig, snr: float, fallback: Tensor):
    from models.mtsc.model import Q_CLS

    model.channel = WirelessChannel(channel)
    h, tx = model(batch, torch.full((batch["image"].shape[0],), snr))
    heads = model.task_decoders
    correct = (heads.classification(h[:, Q_CLS]).argmax(-1) == batch["label"]).float()
    recon = heads.reconstruct(h)
    return {"accuracy": correct, **image_quality(recon, batch["image"])}, tx.symbols_sent


def _mtsc_heads(model, images: Tensor, batch: dict[str, Tensor]):
    from models.mtsc.model import Q_CLS

    model.channel = WirelessChannel(NOISELESS)
    h, _ = model(dict(batch, image=images), torch.full((images.shape[0],), TOP_SNR_DB))
    correct = (model.task_decoders.classification(h[:, Q_CLS]).argmax(-1) == batch["label"])
    return {"accuracy": correct.float(), **image_quality(images, batch["image"])}


def _tosc_learned(cfg: ExperimentConfig, model, batch: dict[str, Tensor],
                  channel: ChannelConfig, snr: float, fallback: Tensor):
    model.channel = WirelessChannel(channel)
    image = batch["image"]
    logits = model(image, torch.full((image.shape[0],), snr)).logits
    symbols = cfg.distill.latent_dim // 2  # the student's complex channel symbols
    return ({"accuracy": (logits.argmax(-1) == batch["label"]).float()},
            torch.full((image.shape[0],), float(symbols)))


def _tosc_heads(model, images: Tensor, batch: dict[str, Tensor]):
    logits = model(images, torch.full((images.shape[0],), TOP_SNR_DB), noiseless=True).logits
    return {"accuracy": (logits.argmax(-1) == batch["label"]).float()}


_LSF: dict[str, Any] = {}  # the last batch's LSF payloads: they do not depend on the link


def _lsf_payloads(cfg: ExperimentConfig, model, images: Tensor) -> list:
    """TACO's LSF payload of each image, as its transmitter chooses it (reports/taco.py)."""
    from models.taco.pipeline import Transmitter
    from models.taco.task import gradcam_scores

    if _LSF.get("model") is model and _LSF.get("images") is images:
        return _LSF["payloads"]
    t, clf = cfg.taco, model.classifier
    scores = gradcam_scores(clf, images, clf(images).argmax(-1))
    payloads = [Transmitter(model.codec, clf, images[i:i + 1], scores[i], t.codec.codebook_size)
                .lsf(t.rates, t.lsf_rule, t.lsf_tolerance, t.lsf_fallback).payload
                for i in range(len(images))]
    _LSF.update(model=model, images=images, payloads=payloads)
    return payloads


def _taco_learned(cfg: ExperimentConfig, model, batch: dict[str, Tensor],
                  channel: ChannelConfig, snr: float, fallback: Tensor):
    from models.taco.digital_link import payload_over_link, received_image
    from models.taco.pipeline import Receiver

    images, K = batch["image"], cfg.taco.codec.codebook_size
    g = torch.Generator().manual_seed(cfg.seed)
    hats, lost, uses = [], [], []
    for payload in _lsf_payloads(cfg, model, images):
        result = payload_over_link(payload, K, "auto", channel.model, snr, g)
        rx = Receiver(model.codec, tuple(payload.mask.shape))
        hats.append(received_image(rx, result, fallback[None]))
        lost.append(result.context_lost)
        uses.append(result.channel_uses)
    hats = torch.cat(hats)
    correct = (model.classifier(hats).argmax(-1) == batch["label"]).float()
    lost = torch.tensor(lost, dtype=torch.float32)
    return ({"accuracy": correct, **image_quality(hats, images), "delivered": 1 - lost,
             "lost": lost}, torch.tensor(uses, dtype=torch.float32))


def _taco_heads(model, images: Tensor, batch: dict[str, Tensor]):
    correct = (model.classifier(images).argmax(-1) == batch["label"]).float()
    return {"accuracy": correct, **image_quality(images, batch["image"])}


def _diffusion_tasks(model, images: Tensor, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The receiver's task net on an image: its hits on the main object's class (what
    its class head learns, models/diffusion/classes.py) and the share of pixels it
    segments right, per image; and the image's quality."""
    from models.diffusion.classes import main_object

    seg_logits, _, class_logits = model.task_net(images)
    target = main_object(batch, model.classes)
    return {"accuracy": (class_logits.argmax(1) == target).float(),
            "pixel_accuracy": (seg_logits.argmax(1) == batch["segmentation"]).float().mean((1, 2)),
            **image_quality(images, batch["image"])}


def _diffusion_learned(cfg: ExperimentConfig, model, batch: dict[str, Tensor],
                       channel: ChannelConfig, snr: float, fallback: Tensor):
    from models.diffusion.link import PHASE1, DigitalLink, three_phase_link

    dc = cfg.diffusion
    mode = "cam" if dc.feedback == "class" else "clip"
    link = DigitalLink(channel.model, snr, "auto", torch.Generator().manual_seed(cfg.seed))
    result = three_phase_link(model, batch["image"], cfg, dc.tau, mode, cfg.seed, link=link)
    lost = result.lost[PHASE1].float()
    return ({**_diffusion_tasks(model, result.recon3, batch), "delivered": 1 - lost,
             "lost": lost}, result.channel_uses)


ENDS = {"mtsc": (_mtsc_learned, _mtsc_heads), "tosc": (_tosc_learned, _tosc_heads),
        "taco": (_taco_learned, _taco_heads), "diffusion": (_diffusion_learned, _diffusion_tasks)}


def _batch(data, n: int) -> dict[str, Tensor]:
    items = [data[i] for i in range(min(n, len(data)))]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def _mean_image(data) -> Tensor:
    return torch.stack([data[i]["image"] for i in range(len(data))]).mean(0)


def cliff(points: list[dict[str, Any]]) -> float | None:
    """The lowest SNR from which on at least half of the images arrive (None: never)."""
    edge = None
    for p in sorted(points, key=lambda p: -p["snr_db"]):
        if p["delivered"] < 0.5:
            break
        edge = p["snr_db"]
    return edge


@torch.no_grad()
def compare(cfg: ExperimentConfig, run_dir: Path, clients: int, images: int,
            codecs: list[str], channels: list[str], snrs: list[float]) -> dict[str, Any]:
    learned_end, heads_end = ENDS[cfg.workload]
    totals: dict[tuple, dict[str, float]] = {}

    def add(key: tuple, metrics: dict[str, Tensor], extra: dict[str, float]) -> None:
        row = totals.setdefault(key, {"n": 0})
        n = len(next(iter(metrics.values())))
        row["n"] += n
        for name, v in {**{k: t.float().sum().item() for k, t in metrics.items()},
                        **{k: x * n for k, x in extra.items()}}.items():
            row[name] = row.get(name, 0.0) + v

    mcs_names: dict[tuple, str] = {}  # the most common row of a point (its budgets differ)
    for pid in range(clients):
        model = restore_client(cfg, run_dir, pid)
        train, test = get_workload(cfg.workload).load_data(cfg, pid, cfg.num_clients)
        batch, fallback = _batch(test, images), _mean_image(train)
        pixels = [separate.to_uint8(img) for img in batch["image"]]
        encodings = {c: [separate.all_qualities(p, c) for p in pixels] for c in codecs}
        for ch in channels:
            for snr in snrs:
                channel = dataclasses.replace(cfg.channel, model=ch, snr_db=snr,
                                              snr_range_db=None)
                with seeded(cfg.seed + pid):
                    metrics, symbols = learned_end(cfg, model, batch, channel, snr, fallback)
                budgets = [int(s) for s in symbols.round().tolist()]
                per_image = sum(budgets) / len(budgets)
                add(("learned", ch, snr), metrics, {"symbols_per_image": per_image})
                link = WirelessChannel(channel)
                for codec in codecs:
                    g = torch.Generator().manual_seed(cfg.seed * 1000 + pid)
                    got = separate.transmit_images(batch["image"], budgets, link, snr, codec,
                                                   "auto", fallback, g, encodings[codec])
                    mcs_names[(f"separate-{codec}", ch, snr)] = Counter(
                        r.name for r in got.mcs).most_common(1)[0][0]
                    with seeded(cfg.seed + pid):
                        metrics = heads_end(model, got.images, batch)
                    arrived = ~(got.lost | got.unsent)
                    add((f"separate-{codec}", ch, snr), metrics, {
                        "symbols_per_image": per_image,
                        "delivered": arrived.float().mean().item(),
                        "lost": got.lost.float().mean().item(),
                        "unsent": got.unsent.float().mean().item(),
                        "quality": (got.quality[arrived].float().mean().item()
                                    if arrived.any() else 0.0)})
    points = []
    for (system, ch, snr), row in totals.items():
        n = row.pop("n")
        points.append({"system": system, "channel": ch, "snr_db": snr, "images": n,
                       **({"mcs": mcs_names[(system, ch, snr)]} if system != "learned" else {}),
                       **{k: v / n for k, v in row.items()}})
    cliffs = {ch: {c: cliff([p for p in points if p["system"] == f"separate-{c}"
                             and p["channel"] == ch]) for c in codecs} for ch in channels}
    return {"workload": cfg.workload, "experiment": cfg.name, "clients": clients,
            "images_per_client": images, "image_size": cfg.data.image_size,
            "channels": channels, "codecs": codecs, "snr_db": snrs, "points": points,
            "cliff_snr_db": cliffs,
            "not_computed": {} if _lpips() is not None else {"lpips": (
                f"its AlexNet backbone's ImageNet weights are not at {lpips_backbone()} "
                "(torchvision's cache; nothing is downloaded: put the file there to score it)")}}


def metric_names(report: dict[str, Any]) -> list[str]:
    skip = {"system", "channel", "snr_db", "images", "mcs", "symbols_per_image", "delivered",
            "lost", "unsent", "quality"}
    return [k for k in report["points"][0] if k not in skip]


def markdown_table(report: dict[str, Any]) -> str:
    names = metric_names(report)
    lines = ["| system | channel | SNR (dB) | " + " | ".join(names)
             + " | symbols / image | delivered | MCS |",
             "|---" * (len(names) + 6) + "|"]
    for p in sorted(report["points"], key=lambda p: (p["channel"], p["system"], p["snr_db"])):
        lines.append(f"| {p['system']} | {p['channel']} | {p['snr_db']:g} | "
                     + " | ".join(f"{p[k]:.3f}" for k in names)
                     + f" | {p['symbols_per_image']:.0f} | {p.get('delivered', 1.0):.2f} | "
                     f"{p.get('mcs', '-')} |")
    cliffs = "; ".join(f"{ch}: " + ", ".join(f"{c} {'none' if s is None else f'{s:g} dB'}"
                                             for c, s in by.items())
                       for ch, by in report["cliff_snr_db"].items())
    return "\n".join(lines) + f"\n\nseparate baseline's cliff (half the images arrive): {cliffs}"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [*metric_names(report), "delivered"]  # the last panel: images that arrived
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 4), squeeze=False)
    colours = dict(zip(report["channels"], ("tab:blue", "tab:red", "tab:green")))
    systems = ["learned"] + [f"separate-{c}" for c in report["codecs"]]
    styles = dict(zip(systems, ("-", "--", ":", "-.")))
    for ax, name in zip(axes[0], names):
        for ch in report["channels"]:
            for system in systems:
                pts = sorted((p["snr_db"], p.get(name, 1.0)) for p in report["points"]
                             if p["system"] == system and p["channel"] == ch)
                ax.plot(*zip(*pts), styles[system], color=colours[ch], marker=".",
                        label=f"{system} ({ch})")
        ax.set_xlabel("SNR (dB)")
        ax.set_ylabel(name if name != "delivered" else "share of images delivered")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    symbols = sorted({round(p["symbols_per_image"]) for p in report["points"]})
    fig.suptitle(f"{report['workload']}: learned JSCC vs. separate coding at equal channel "
                 f"uses ({symbols[0]}-{symbols[-1]} symbols per {report['image_size']}px image)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = report_parser("separate", __doc__, "configs/quickstart.yaml")
    parser.add_argument("--run", type=Path, default=None,
                        help="a finished run's folder to read instead of training one")
    parser.add_argument("--codecs", nargs="+", default=list(separate.CODECS),
                        choices=list(separate.CODECS))
    parser.add_argument("--fading", default="rayleigh",
                        help="the fading channel beside AWGN (a channel.model name)")
    parser.add_argument("--snr", type=float, nargs="+", default=SNRS)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--images", type=int, default=32, help="test images per client")
    args = parser.parse_args(argv)

    def check(cfg: ExperimentConfig) -> None:
        need(cfg.workload in WORKLOADS, "workload", cfg.workload,
             f"one of {', '.join(WORKLOADS)} for this report")
        need(args.fading in CHANNEL_MODELS and args.fading not in ("none", "awgn"),
             "--fading", args.fading,
             f"one of {', '.join(m for m in CHANNEL_MODELS if m not in ('none', 'awgn'))}")
        need(1 <= args.clients <= cfg.num_clients, "--clients", args.clients,
             f"1 .. num_clients ({cfg.num_clients})")
        need(args.images >= 1, "--images", args.images, ">= 1")

    cfg = report_config(args, None if args.run else check)
    if args.run is not None:  # the run's own config, checked as --config's would be
        try:
            cfg, _ = finished_run(args.run)
            check(cfg)
        except (ConfigError, RunFolderError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    out = report_folder(args, cfg, "separate")
    if args.run is None:
        run_dir = out / "run"
        simulation_run(args.config, args.overrides, run_dir)
    else:
        run_dir = args.run
    report = compare(cfg, run_dir, args.clients, args.images, args.codecs,
                     ["awgn", args.fading], args.snr)
    finish_report(cfg, out, report, plot, markdown_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
