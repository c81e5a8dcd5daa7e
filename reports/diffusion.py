"""The diffusion report: the paper's tau sweep and its baselines.

    python -m reports.diffusion --config configs/diffusion_quickstart.yaml [--out DIR] [key=value ...]

1. pretrains the DDPM and the one-step decoder if their checkpoint is missing;
2. runs the federated LoRA fine-tuning on Flower's Ray simulation in a fresh process,
   every client keeping its private nets on its own disk (the run's client-state/);
3. rebuilds every client as it ended (its saved private nets, the final global adapters)
   and runs the three-phase link over its first diffusion.eval_samples test scenes:
   phase 1 once (seg only), then phase 3 with CAM-masked edges at every tau of
   diffusion.tau_sweep, with all edges (no attention) and with an oracle attention
   (the true mask of the requested class, dilated by one patch and not dilated: what
   attention could reach); the same with the one-step decoder in place of the DDPM;
   with a local CLIP (diffusion.clip_checkpoint), phase 3 with CLIP attention at every
   tau as well (the feedback diffusion.feedback names; the CAM rows always take the
   class); and probes the private nets on the originals (`probe_private_nets`);
4. scores each run with the client's own receiver task net, pools the clients and writes
   report.json, report.png (task gain against bytes), reconstructions.png (originals
   beside the phase-1 and phase-3 reconstructions) and a Markdown table.

The goal it checks: CAM-masked edges reach at least 90% of the all-edges IoU gain at
no more than half its phase-3 bytes; the report says which tau (if any) reaches it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib
import torch
import torch.nn.functional as F
from torch import Tensor

from common.config import ExperimentConfig, config_from_dict, need
from common.device import resolve_device
from models.diffusion import codec, feedback
from models.diffusion import workload as diffusion
from models.diffusion.classes import main_object, mask_classes
from models.diffusion.clip_attention import load_clip
from models.diffusion.ddpm import cond_channels, make_unet
from models.diffusion.link import (
    LinkResult,
    Phase1,
    cam_attention,
    message_payload,
    run_phase1,
    run_phase3,
    three_phase_link,
    with_feedback,
)
from models.diffusion.model import presence
from models.diffusion.pretrain import ensure_pretrained, load_pretrained
from models.diffusion.train import eval_batches, link_metrics
from reports.cli import report_config, report_folder, report_parser, track_report
from reports.runs import restore_client, simulation_run

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402

MIN_GAIN = 0.01  # an all-edges IoU gain smaller than this has no share worth reporting
# The depth columns only where the source has depth maps (the synthetic scenes).
COLUMNS = (("iou", "IoU req. class"), ("psnr", "PSNR dB"), ("ssim", "SSIM"),
           ("depth_rmse", "depth RMSE"), ("depth_si_rmse", "SI-RMSE"), ("accuracy", "cls acc"))


def columns_of(results: dict[str, dict]) -> tuple[tuple[str, str], ...]:
    """The COLUMNS the link's metrics hold."""
    first = next(iter(results.values()))
    return tuple((k, t) for k, t in COLUMNS if f"{k}_phase1" in first)


ORACLE = "oracle attention (true mask)"
ORACLE_TIGHT = "oracle attention, no dilation"


def class_region(seg: Tensor, classes: Tensor, dilation: int) -> Tensor:
    """[B, S, S]: each scene's true mask of its class `classes` (0-based, so segmentation
    id + 1), dilated by `dilation` pixels: the attention an oracle would give."""
    region = (seg == (classes + 1)[:, None, None]).float()[:, None]
    return F.max_pool2d(region, 2 * dilation + 1, stride=1, padding=dilation)[:, 0]


def oracle_link(model: diffusion.DiffusionSemCom, batch: dict[str, Tensor], cfg: ExperimentConfig,
                seed: int, phase1: Phase1, dilation: int) -> LinkResult:
    """Phase 3 with M_A = the transmitter's true mask of the requested class (dilated by
    `dilation` pixels) instead of its CAM: what attention could reach, through the same
    messages and DDPM as `three_phase_link`."""
    image = batch["image"]
    objects = mask_classes(cfg.data).objects
    requested = torch.tensor([feedback.decode_class(message_payload(m), objects)
                              for m in phase1.feedback], device=image.device)
    x_att_tx = (class_region(batch["segmentation"], requested, dilation)
                * codec.edge_map(image, cfg.diffusion.edge_threshold))
    return run_phase3(model, x_att_tx, phase1, cfg, seed)


@torch.no_grad()
def probe_private_nets(model: diffusion.DiffusionSemCom, batch: dict[str, Tensor],
                       requested: Tensor, cfg: ExperimentConfig) -> dict[str, float]:
    """Sums over a batch of what the private nets do on the originals (pooled by
    `probe_scores`): the segmentation nets' object IoU, the classifiers' accuracy on the
    main object class (the synthetic scenes' label; classes.main_object), the
    receiver's requests, and how well the CAM localises a class: its energy inside the
    class's dilated true mask (the energy-based pointing game of Score-CAM, Wang et al.
    2020) against that mask's area share (what a CAM blind to the class scores)."""
    dc, image, seg = cfg.diffusion, batch["image"], batch["segmentation"]
    mc = mask_classes(cfg.data)
    present = presence(seg, mc.objects).bool()
    main = main_object(batch, mc)
    out: dict[str, float] = {"n": len(image)}
    for name, pred in (("seg", model.seg_net(image).argmax(1)),
                       ("task", model.task_net(image)[0].argmax(1))):
        for c in range(1, mc.count):
            out[f"{name}_inter{c}"] = ((pred == c) & (seg == c)).sum().item()
            out[f"{name}_union{c}"] = ((pred == c) | (seg == c)).sum().item()
    top = model.classifier(image).argmax(1)
    out["cls_label"] = (top == main).sum().item()
    out["cls_present"] = present.gather(1, top[:, None]).sum().item()
    out["request_present"] = present.gather(1, requested[:, None]).sum().item()
    out["request_label"] = (requested == main).sum().item()
    # A scene with no object in its mask has no main class: the CAM of its request there.
    for name, classes in (("label", torch.where(main >= 0, main, requested)),
                          ("request", requested)):
        cam = cam_attention(model.classifier, image, classes)
        region = class_region(seg, classes, dc.edge_patch)
        mask = codec.attention_mask(cam, dc.tau)
        out[f"cam_{name}_energy_in"] = ((cam * region).sum((1, 2)) / cam.sum((1, 2)).clamp_min(1e-9)).sum().item()
        out[f"cam_{name}_region_share"] = region.mean((1, 2)).sum().item()
        out[f"cam_{name}_mask_precision"] = ((mask * region).sum((1, 2))
                                             / mask.sum((1, 2)).clamp_min(1)).sum().item()
    return out


def probe_scores(parts: list[dict[str, float]], seg_classes: int) -> dict[str, float]:
    """`probe_private_nets`' sums pooled; object IoUs averaged over the mask's
    `seg_classes` - 1 object classes."""
    tot = {k: sum(p[k] for p in parts) for k in parts[0]}
    n = tot.pop("n")
    out = {}
    for name in ("seg", "task"):
        ious = [tot[f"{name}_inter{c}"] / max(tot[f"{name}_union{c}"], 1)
                for c in range(1, seg_classes)]
        out[f"{name}_object_iou"] = sum(ious) / len(ious)
    out.update({k: v / n for k, v in tot.items() if "_inter" not in k and "_union" not in k})
    return out


def sweep(cfg: ExperimentConfig, run_dir: Path, device) -> tuple[dict[str, dict], dict, dict]:
    """Every configuration of the link, pooled over the clients; and client 0's first
    batch for the figure."""
    dc, classes = cfg.diffusion, mask_classes(cfg.data)
    decoder = make_unet(cfg, cond_channels(cfg)).to(device)
    decoder.load_state_dict(load_pretrained(cfg)["decoder"])
    decoder.eval()
    runs: dict[str, list] = {}
    figure: dict[str, Any] = {}
    cam_cfg = config_from_dict(cfg.to_dict(), {"diffusion.feedback": "class"})
    probes: list[dict[str, float]] = []
    for pid in range(cfg.num_clients):
        model = restore_client(cfg, run_dir, pid, device)
        _, test = diffusion.load_data(cfg, pid, cfg.num_clients)
        for i, batch in enumerate(eval_batches(test, cfg, device)):
            seed = cfg.seed + i
            image = batch["image"]
            first = run_phase1(model, image, cfg, seed)
            # Grad-CAM scores a class: with text feedback the CAM rows get the class the
            # receiver asked for, from the same phase 1 (both ends on class feedback).
            cam_first = (first if dc.feedback == "class"
                         else with_feedback(model, first, "class", classes))
            jobs = [(f"CAM edges, tau={t:g}", "cam", t, cam_first, cam_cfg) for t in dc.tau_sweep]
            jobs.append(("all edges", "all", 0.0, cam_first, cam_cfg))
            if dc.clip_checkpoint:
                jobs += [(clip_row(cfg, t), "clip", t, first, cfg) for t in dc.tau_sweep]
            for name, mode, tau, phase1, link_cfg in jobs:
                res = three_phase_link(model, image, link_cfg, tau, mode, seed, phase1=phase1)
                runs.setdefault(name, []).append((res, batch, model))
                if pid == 0 and i == 0:
                    figure[name] = res
            # Dilated by one patch (edges on the object's outline survive the patching),
            # and not at all.
            for name, dilation in ((ORACLE, dc.edge_patch), (ORACLE_TIGHT, 0)):
                runs.setdefault(name, []).append(
                    (oracle_link(model, batch, cfg, seed, cam_first, dilation), batch, model))
            probes.append(probe_private_nets(model, batch, cam_first.requested, cfg))
            first_d = run_phase1(model, image, cfg, seed, decoder=decoder)
            if dc.feedback != "class":
                first_d = with_feedback(model, first_d, "class", classes)
            for name, mode in ((f"one-step decoder, CAM tau={dc.tau:g}", "cam"),
                               ("one-step decoder, all edges", "all")):
                res = three_phase_link(model, image, cam_cfg, dc.tau, mode, seed, decoder=decoder,
                                       phase1=first_d)
                runs.setdefault(name, []).append((res, batch, model))
            if pid == 0 and i == 0:
                figure["image"] = image.cpu()
        print(f"client {pid}: {len(test)} test scenes, scored {min(len(test), dc.eval_samples)}",
              flush=True)
    return ({name: link_metrics(parts, cfg) for name, parts in runs.items()}, figure,
            probe_scores(probes, classes.count))


def clip_row(cfg: ExperimentConfig, tau: float) -> str:
    text = ", text feedback" if cfg.diffusion.feedback == "text" else ""
    return f"CLIP attention{text}, tau={tau:g}"


def rows_of(results: dict[str, dict]) -> list[dict[str, Any]]:
    """Table rows: phase 1 (seg only) of the DDPM and of the one-step decoder, then
    every phase-3 configuration."""
    rows = []
    columns = columns_of(results)
    ddpm1 = results["all edges"]
    rows.append({"method": "seg only (phase 1), DDPM", "bytes": ddpm1["bytes_phase1"],
                 "bytes_phase3": 0.0, "patches": 0.0, "rate": ddpm1["rate_phase1"],
                 **{k: ddpm1[f"{k}_phase1"] for k, _ in columns}, "iou_gain": 0.0})
    d1 = results["one-step decoder, all edges"]
    rows.append({"method": "seg only (phase 1), one-step decoder", "bytes": d1["bytes_phase1"],
                 "bytes_phase3": 0.0, "patches": 0.0, "rate": d1["rate_phase1"],
                 **{k: d1[f"{k}_phase1"] for k, _ in columns}, "iou_gain": 0.0})
    for name, m in results.items():
        rows.append({"method": name, "bytes": m["bytes_phase1"] + m["bytes_phase3"],
                     "bytes_phase3": m["bytes_phase3"], "patches": m["edge_patches"],
                     "rate": m["rate_phase3"], **{k: m[f"{k}_phase3"] for k, _ in columns},
                     "iou_gain": m["iou_gain"]})
    return rows


def goal(results: dict[str, dict], cfg: ExperimentConfig) -> list[dict[str, Any]]:
    """Per tau (and for the oracle attentions): share of the all-edges IoU gain
    reached, share of its phase-3 bytes. A share of a gain below MIN_GAIN is noise, not
    a result: it is left out (NaN)."""
    full = results["all edges"]
    out = []
    named = [(f"{t:g}", f"CAM edges, tau={t:g}") for t in cfg.diffusion.tau_sweep]
    for t, name in named + [("oracle", ORACLE), ("oracle, no dilation", ORACLE_TIGHT)]:
        m = results[name]
        gain_share = (m["iou_gain"] / full["iou_gain"] if full["iou_gain"] >= MIN_GAIN
                      else float("nan"))
        byte_share = m["bytes_phase3"] / max(full["bytes_phase3"], 1e-9)
        out.append({"tau": t, "gain_share": gain_share, "bytes_share": byte_share,
                    "reached": bool(gain_share >= 0.9 and byte_share <= 0.5)})
    return out


def markdown(rows: list[dict[str, Any]], goals: list[dict[str, Any]],
             probe: dict[str, float]) -> str:
    columns = [(k, t) for k, t in COLUMNS if k in rows[0]]
    head = ("| method | " + " | ".join(t for _, t in columns)
            + " | IoU gain | phase-3 B | patches | total B | rate |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['method']} | " + " | ".join(
            f"{r[k]:.2f}" if k == "psnr" else f"{r[k]:.3f}" for k, _ in columns)
            + f" | {r['iou_gain']:+.3f} | {r['bytes_phase3']:.1f} | {r['patches']:.1f} | "
              f"{r['bytes']:.1f} | {100 * r['rate']:.2f}% |")
    lines.append("")
    lines.append("| tau | share of the all-edges IoU gain | share of its phase-3 bytes | goal (>= 90%, <= 50%) |")
    lines.append("|---|---|---|---|")
    for g in goals:
        lines.append(f"| {g['tau']} | {100 * g['gain_share']:.0f}% | {100 * g['bytes_share']:.0f}% "
                     f"| {'reached' if g['reached'] else 'not reached'} |")
    lines.append("")
    lines.append("| private nets on the originals | value |")
    lines.append("|---|---|")
    for k, v in probe.items():
        lines.append(f"| {k} | {v:.3f} |")
    return "\n".join(lines)


def plot_tradeoff(results: dict[str, dict], cfg: ExperimentConfig, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    taus = cfg.diffusion.tau_sweep
    cam = [results[f"CAM edges, tau={t:g}"] for t in taus]
    full = results["all edges"]
    for ax, key, label in ((axes[0], "iou", "requested-class IoU"), (axes[1], "psnr", "PSNR (dB)")):
        ax.plot([m["bytes_phase3"] for m in cam], [m[f"{key}_phase3"] for m in cam], "-o",
                label="CAM-masked edges (tau sweep)")
        for t, m in zip(taus, cam):
            ax.annotate(f"{t:g}", (m["bytes_phase3"], m[f"{key}_phase3"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
        clip = [results[n] for n in (clip_row(cfg, t) for t in taus) if n in results]
        if clip:
            ax.plot([m["bytes_phase3"] for m in clip], [m[f"{key}_phase3"] for m in clip], "-^",
                    label="CLIP-masked edges (tau sweep)")
        ax.plot([full["bytes_phase3"]], [full[f"{key}_phase3"]], "s", label="all edges")
        oracle = results[ORACLE]
        ax.plot([oracle["bytes_phase3"]], [oracle[f"{key}_phase3"]], "^", label=ORACLE)
        ax.axhline(full[f"{key}_phase1"], ls="--", c="gray", label="phase 1 (seg only)")
        ax.set_xlabel("phase-3 bytes per image")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reconstructions(figure: dict[str, Any], cfg: ExperimentConfig, path: Path,
                         n: int = 8) -> None:
    """Originals, the received class map, phase 1, x_att and phase 3 (CAM at tau),
    all-edges phase 3: one column per scene."""
    cam = figure[f"CAM edges, tau={cfg.diffusion.tau:g}"]
    full = figure["all edges"]
    n = min(n, len(figure["image"]))
    seg_classes = mask_classes(cfg.data).count  # tab10 up to 10 classes, as before
    class_cmap, class_vmax = ("tab10", 9) if seg_classes <= 10 else ("nipy_spectral",
                                                                     seg_classes - 1)
    rows = [("original", figure["image"]),
            ("x_seg (phase 1)", cam.seg_small),
            ("phase 1", cam.recon1),
            (f"x_att, tau={cfg.diffusion.tau:g}", cam.x_att),
            ("phase 3, CAM", cam.recon3),
            ("x_edge (all)", full.x_att),
            ("phase 3, all edges", full.recon3)]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.3 * n, 1.35 * len(rows)), squeeze=False)
    for r, (title, images) in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            img = images[c].detach().cpu()
            if img.dim() == 3:
                ax.imshow(img.permute(1, 2, 0).numpy().clip(0, 1))
            elif not img.is_floating_point():  # a class map: one colour per class
                ax.imshow(img.numpy(), cmap=class_cmap, vmin=0, vmax=class_vmax,
                          interpolation="nearest")
            else:
                ax.imshow(img.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = report_parser("diffusion", __doc__, "configs/diffusion_quickstart.yaml")
    parser.add_argument("--run-dir", dest="out", type=Path, help="the same as --out")
    args = parser.parse_args(argv)
    cfg = report_config(args, lambda c: need(c.workload == "diffusion", "workload", c.workload,
                                             "'diffusion' for this report"))
    start = time.perf_counter()
    out = report_folder(args, cfg, "diffusion")
    ensure_pretrained(cfg)
    if cfg.diffusion.clip_checkpoint:
        load_clip(cfg.diffusion.clip_checkpoint)  # a missing CLIP fails now, not after the run
    run_dir = out / "federated"
    metrics = simulation_run(args.config, args.overrides, run_dir)
    device = resolve_device(cfg.device)
    with torch.no_grad():
        torch.manual_seed(cfg.seed)
        results, figure, probe = sweep(cfg, run_dir, device)
    rows, goals = rows_of(results), goal(results, cfg)
    plot_tradeoff(results, cfg, out / "report.png")
    plot_reconstructions(figure, cfg, out / "reconstructions.png")
    table = markdown(rows, goals, probe)
    report = {"config": cfg.to_dict(), "rows": rows, "goal": goals, "results": results,
              "private_nets": probe,
              "federated_rounds": metrics.get("rounds", []),
              "pretrain_seconds": load_pretrained(cfg).get("seconds"),
              "seconds": time.perf_counter() - start}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(table + "\n")
    print(table)
    print(f"\nwritten to {out} ({report['seconds']:.0f} s)")
    track_report(cfg, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
