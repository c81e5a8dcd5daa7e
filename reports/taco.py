"""The taco report: TACO against classic image codecs, and its ablations.

    python -m reports.taco --config configs/taco_quickstart.yaml [key=value ...]

1. pre-trains the codec if its file is missing, then runs the federated rounds on
   Flower's Ray simulation (python -m simulation, in a fresh process);
2. takes the final global codec and every client's own task models (the private state
   the clients left on their disk) and judges, on each client's test images with that
   client's classifier: JPEG and WebP quality sweeps (Pillow; bytes of the whole file
   and of the coded data alone, headers and tables left out), TACO at fixed p (GradCAM
   masks; p = 0 is context only, p = 100 the full latent), TACO with LSF, and random
   masks with as many positions as LSF's (the same bytes) and as fixed 30 %;
3. sends the LSF payloads' context and task indices as two transport blocks over the
   noisy digital link (models/digital_phy.py: 5G LDPC, CRC24A, QAM; the MCS of
   taco.link.mcs) on every channel of taco.link.channels at every SNR of
   taco.link.sweep_snr_db; a lost task block decodes from the context alone (as
   p = 0), a lost context block leaves the client's mean training image;
4. runs the task switch (segmentation of the predicted class) and measures the
   extra bytes and the IoU before and after;
5. writes report.json, report.md, report.png (accuracy vs. KB per image) and
   link.png (accuracy and PSNR vs. SNR), and prints the Markdown tables.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from common.config import ExperimentConfig, need
from models.taco import workload as taco
from models.taco.codec import ensure_codec
from models.taco.digital_link import fallback_image, payload_over_link, received_image
from models.taco.payload import deserialise, message_bytes, message_payload
from models.taco.pipeline import Receiver, Transmitter, switch_request
from models.taco.task import SWITCH_FOREGROUND, gradcam_scores, random_mask, segment
from models.taco.train import evaluation_images, image_quality
from reports.cli import report_config, report_folder, report_parser, track_report
from reports.runs import restore_client, simulation_run

JPEG_QUALITIES = (1, 5, 10, 20, 30, 50, 75, 90)
WEBP_QUALITIES = (0, 5, 10, 20, 30, 50, 75, 90)
# Marker segments a JPEG decoder could hold in advance (same for every image of a
# quality): APPn, COM, quantisation and Huffman tables.
_JPEG_SIDE = {0xC4, 0xDB, 0xFE, *range(0xE0, 0xF0)}


# ----------------------------------------------------------------------------- classic codecs


def _to_pil(x: torch.Tensor) -> Image.Image:
    arr = (x.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def _from_pil(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)


def jpeg_data_bytes(data: bytes) -> int:
    """A JPEG file's bytes without its APPn/COM segments and its tables (DQT, DHT)."""
    pos, side = 2, 0
    while pos < len(data):
        if data[pos] != 0xFF:
            raise ValueError(f"not a JPEG marker at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xDA:  # start of scan: entropy-coded data follows to the end
            break
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker in _JPEG_SIDE:
            side += 2 + length
        pos += 2 + length
    return len(data) - side


def webp_data_bytes(data: bytes) -> int:
    """A lossy WebP file's bytes without the RIFF/WEBP header and the chunk header."""
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP" or data[12:16] != b"VP8 ":
        raise ValueError("expected a simple lossy WebP (RIFF, WEBP, one 'VP8 ' chunk)")
    return int.from_bytes(data[16:20], "little")


def classic(images: torch.Tensor, fmt: str, quality: int) -> tuple[torch.Tensor, list[int], list[int]]:
    """Decoded images, file bytes and data bytes of a Pillow codec at one quality."""
    decoded, full, bare = [], [], []
    for x in images:
        buf = io.BytesIO()
        if fmt == "JPEG":
            _to_pil(x).save(buf, format="JPEG", quality=quality)
        else:
            _to_pil(x).save(buf, format="WEBP", quality=quality, method=6)
        data = buf.getvalue()
        full.append(len(data))
        bare.append(jpeg_data_bytes(data) if fmt == "JPEG" else webp_data_bytes(data))
        decoded.append(_from_pil(Image.open(io.BytesIO(data))))
    return torch.stack(decoded), full, bare


# ----------------------------------------------------------------------------- one client


class Tally:
    """Per-method sums over all clients' images."""

    def __init__(self):
        self.rows: dict[str, dict[str, float]] = {}

    def add(self, name: str, correct: torch.Tensor, nbytes: list[float], psnr: torch.Tensor,
            ssim: torch.Tensor, **extra: list[float]) -> None:
        row = self.rows.setdefault(name, {"n": 0, "correct": 0.0, "bytes": 0.0, "psnr": 0.0,
                                          "ssim": 0.0})
        row["n"] += len(correct)
        row["correct"] += float(correct.float().sum())
        row["bytes"] += float(sum(nbytes))
        row["psnr"] += float(psnr.sum())
        row["ssim"] += float(ssim.sum())
        for k, v in extra.items():
            row[k] = row.get(k, 0.0) + float(sum(v))

    def table(self) -> dict[str, dict[str, float]]:
        out = {}
        for name, r in self.rows.items():
            n = r["n"]
            out[name] = {"accuracy": r["correct"] / n, "kb_per_image": r["bytes"] / n / 1000,
                         "psnr": r["psnr"] / n, "ssim": r["ssim"] / n, "images": n,
                         **{k: v / n for k, v in r.items()
                            if k not in ("n", "correct", "bytes", "psnr", "ssim")}}
        return out


@torch.no_grad()
def judge_client(cfg: ExperimentConfig, model: taco.TacoSystem, data, tally: Tally,
                 link_tally: dict, switch: dict, seed: int, fallback: torch.Tensor) -> None:
    """Every method on the client's test images `data`; `fallback` [1, 3, S, S] is what
    its receiver shows when the link loses a payload's context block."""
    t = cfg.taco
    K = t.codec.codebook_size
    d = evaluation_images(data, cfg.taco)
    images, labels, segs = d["image"], d["label"], d.get("segmentation")
    clf = model.classifier

    def judge(name: str, decoded: torch.Tensor, nbytes: list[float], **extra) -> None:
        psnr, ssim = image_quality(decoded, images)
        tally.add(name, clf(decoded).argmax(-1) == labels, nbytes, psnr, ssim, **extra)

    judge("original", images, [0.0] * len(images))
    for q in JPEG_QUALITIES:
        decoded, full, bare = classic(images, "JPEG", q)
        judge(f"jpeg q{q}", decoded, full, data_bytes=bare)
    for q in WEBP_QUALITIES:
        decoded, full, bare = classic(images, "WEBP", q)
        judge(f"webp q{q}", decoded, full, data_bytes=bare)
    reference = clf(images).argmax(-1)
    scores = gradcam_scores(clf, images, reference)
    g = torch.Generator().manual_seed(seed)
    fixed = {r: ([], []) for r in t.rates}
    lsf_img, lsf_bytes, lsf_rate, lsf_payloads = [], [], [], []
    rnd_img, rnd_bytes, rnd30_img, rnd30_bytes = [], [], [], []
    for i in range(len(images)):
        x = images[i:i + 1]
        tx = Transmitter(model.codec, clf, x, scores[i], K)
        for r in t.rates:
            sent = tx.at_rate(r)
            fixed[r][0].append(sent.image)
            fixed[r][1].append(message_bytes(sent.message))
        sent = tx.lsf(t.rates, t.lsf_rule, t.lsf_tolerance, t.lsf_fallback)
        rx = Receiver(model.codec, tx.grid)
        x_hat = rx.receive_message(sent.message, K)
        lsf_img.append(x_hat)
        lsf_bytes.append(message_bytes(sent.message))
        lsf_rate.append(sent.payload.rate)
        lsf_payloads.append(sent.payload)
        for count, imgs, nbytes in ((int(sent.payload.mask.sum()), rnd_img, rnd_bytes),
                                    (round(t.fixed_rate / 100 * sent.payload.mask.numel()),
                                     rnd30_img, rnd30_bytes)):
            m = random_mask(tx.grid, count, g)
            s = tx.send(m, sent.payload.rate)
            imgs.append(s.image)
            nbytes.append(message_bytes(s.message))
        # Task switch after the classification-optimised (LSF) transmission: off
        # where the source has no masks (models/taco/task.py switch_mode).
        if model.segmenter is None:
            continue
        predicted = int(clf(x_hat).argmax())
        foreground = model.switch == SWITCH_FOREGROUND

        def mine(image: torch.Tensor) -> torch.Tensor:
            return segment(model.segmenter(image).argmax(1)[0], predicted, foreground)

        truth = segment(segs[i], predicted, foreground)
        before = mine(x_hat)
        request = switch_request(model.segmenter, x_hat, predicted, t.switch_confidence,
                                 foreground=foreground)
        reply = tx.answer_request(request, rx.sent)
        x_more = rx.receive_message(reply, K)
        after, on_x, full = mine(x_more), mine(x), mine(fixed[100][0][-1])
        for key, pred in (("before", before), ("after", after), ("original", on_x),
                          ("full_latent", full)):
            switch[f"inter_{key}"] = switch.get(f"inter_{key}", 0) + int((pred & truth).sum())
            switch[f"union_{key}"] = switch.get(f"union_{key}", 0) + int((pred | truth).sum())
        switch["extra_bytes"] = switch.get("extra_bytes", 0) + message_bytes(reply)
        switch["first_bytes"] = switch.get("first_bytes", 0) + lsf_bytes[-1]
        switch["images"] = switch.get("images", 0) + 1
        new = deserialise_positions(reply, tx.grid, K)
        switch["repeated_positions"] = (switch.get("repeated_positions", 0)
                                        + int((new & sent.payload.mask).sum()))
    for r in t.rates:
        judge(f"taco p={r}", torch.cat(fixed[r][0]), fixed[r][1])
    judge("taco LSF", torch.cat(lsf_img), lsf_bytes, rate=lsf_rate)
    judge("random mask, LSF's count", torch.cat(rnd_img), rnd_bytes)
    judge(f"random mask, {t.fixed_rate}%", torch.cat(rnd30_img), rnd30_bytes)
    # The digital link: the LSF payloads' indices as two LDPC + CRC transport blocks
    # through noise; "clean" is the same images over an error-free link. A lost task
    # block decodes as p = 0, a lost context block shows `fallback`.
    link = t.link
    clean = torch.cat(lsf_img[:link.images])
    psnr, _ = image_quality(clean, images[:len(clean)])
    row = link_tally.setdefault("clean", {"n": 0, "correct": 0, "psnr": 0.0})
    row["n"] += len(clean)
    row["correct"] += int((clf(clean).argmax(-1) == labels[:len(clean)]).sum())
    row["psnr"] += float(psnr.sum())
    for channel in link.channels:
        for snr in link.sweep_snr_db:
            hats = []
            row = link_tally.setdefault((channel, snr), {
                "n": 0, "correct": 0, "psnr": 0.0, "context_lost": 0, "task_lost": 0,
                "bit_errors": 0, "bits": 0, "channel_uses": 0, "mcs": ""})
            for payload in lsf_payloads[:link.images]:
                result = payload_over_link(payload, K, link.mcs, channel, snr, g)
                rx = Receiver(model.codec, tuple(payload.mask.shape))
                hats.append(received_image(rx, result, fallback))
                row["context_lost"] += int(result.context_lost)
                row["task_lost"] += int(result.task_lost)
                row["bit_errors"] += result.bit_errors
                row["bits"] += result.bits
                row["channel_uses"] += result.channel_uses
                row["mcs"] = result.mcs.name  # the same at every image of one SNR
            hats = torch.cat(hats)
            psnr, _ = image_quality(hats, images[:len(hats)])
            row["n"] += len(hats)
            row["correct"] += int((clf(hats).argmax(-1) == labels[:len(hats)]).sum())
            row["psnr"] += float(psnr.sum())


def deserialise_positions(message, grid, codebook_size) -> torch.Tensor:
    """The latent positions a message carries, read from its bytes."""
    return deserialise(message_payload(message), grid, codebook_size).mask


# ----------------------------------------------------------------------------- summary


def equal_accuracy_ratios(rows: dict[str, dict[str, float]]) -> dict[str, Any]:
    """TACO LSF's bytes against the smallest JPEG / WebP file that is at least as
    accurate (file bytes and data bytes), or None when no quality reaches it."""
    ours = rows["taco LSF"]
    out: dict[str, Any] = {"taco_lsf_kb": ours["kb_per_image"], "taco_lsf_accuracy": ours["accuracy"]}
    for fmt in ("jpeg", "webp"):
        ok = [r for name, r in rows.items() if name.startswith(fmt + " ")
              and r["accuracy"] >= ours["accuracy"]]
        best = min(ok, key=lambda r: r["kb_per_image"]) if ok else None
        out[fmt] = None if best is None else {
            "kb_per_image": best["kb_per_image"], "data_kb_per_image": best["data_bytes"] / 1000,
            "accuracy": best["accuracy"],
            "ratio_file": ours["kb_per_image"] / best["kb_per_image"],
            "ratio_data": ours["kb_per_image"] / (best["data_bytes"] / 1000)}
        out[f"{fmt}_best_accuracy"] = max(r["accuracy"] for name, r in rows.items()
                                          if name.startswith(fmt + " "))
    return out


def markdown_table(report: dict[str, Any]) -> str:
    lines = ["| method | bytes per image (file) | bytes per image (data only) | accuracy | "
             "PSNR (dB) | SSIM |", "|---|---|---|---|---|---|"]
    for name, r in report["methods"].items():
        data = f"{r['data_bytes']:.0f}" if "data_bytes" in r else "-"
        extra = f" (mean p {r['rate']:.1f} %)" if "rate" in r else ""
        lines.append(f"| {name}{extra} | {1000 * r['kb_per_image']:.1f} | {data} | "
                     f"{r['accuracy']:.3f} | {r['psnr']:.2f} | {r['ssim']:.3f} |")
    return "\n".join(lines)


def link_table(report: dict[str, Any]) -> str:
    clean = report["link_error_free"]
    lines = [f"Digital link: the LSF payloads of {clean['images']} images, context and task "
             "indices in two 5G LDPC + CRC24A transport blocks. A lost task block decodes "
             "from the context alone (as p = 0); a lost context block leaves the client's "
             f"mean training image. Error-free link: accuracy {clean['accuracy']:.3f}, "
             f"PSNR {clean['psnr']:.2f} dB.", "",
             "| channel | SNR (dB) | MCS | accuracy | PSNR (dB) | context lost | task lost | "
             "channel uses per image | undetected index BER |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["link"]:
        lines.append(f"| {r['channel']} | {r['snr_db']:g} | {r['mcs']} | {r['accuracy']:.3f} | "
                     f"{r['psnr']:.2f} | {r['context_lost']:.3f} | {r['task_lost']:.3f} | "
                     f"{r['channel_uses_per_image']:.1f} | {r['undetected_bit_error_rate']:.2g} |")
    return "\n".join(lines)


def plot(report: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["methods"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for prefix, label, key in (("jpeg ", "JPEG (file)", "kb_per_image"),
                               ("jpeg ", "JPEG (data only)", "data_bytes"),
                               ("webp ", "WebP (file)", "kb_per_image"),
                               ("webp ", "WebP (data only)", "data_bytes"),
                               ("taco p=", "TACO, fixed p (GradCAM)", "kb_per_image")):
        pts = sorted((r[key] if key == "kb_per_image" else r[key] / 1000, r["accuracy"])
                     for n, r in rows.items() if n.startswith(prefix))
        ax.plot(*zip(*pts), "o-" if "data" not in label else "o--", label=label, markersize=4)
    for name, marker in (("taco LSF", "*"), ("random mask, LSF's count", "x"),
                         (f"random mask, {report['config']['taco']['fixed_rate']}%", "s")):
        r = rows[name]
        ax.plot(r["kb_per_image"], r["accuracy"], marker, markersize=12 if marker == "*" else 8,
                label=name)
    ax.axhline(rows["original"]["accuracy"], color="grey", ls=":", label="original images")
    ax.set_xscale("log")
    ax.set_xlabel("KB per image")
    ax.set_ylabel("accuracy (each client's own classifier)")
    ax.set_title("task accuracy vs. bytes per image")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=120)
    plt.close(fig)

    link = report["link"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    mcs = report["config"]["taco"]["link"]["mcs"]
    for channel in sorted({r["channel"] for r in link}):
        pts = sorted((r["snr_db"], r["accuracy"], r["psnr"]) for r in link
                     if r["channel"] == channel)
        label = f"{channel}, MCS {mcs}"
        a1.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label, markersize=3)
        a2.plot([p[0] for p in pts], [p[2] for p in pts], "o-", label=label, markersize=3)
    a1.axhline(report["link_error_free"]["accuracy"], color="grey", ls=":",
               label="error-free link")
    a2.axhline(report["link_error_free"]["psnr"], color="grey", ls=":", label="error-free link")
    for a, y in ((a1, "accuracy"), (a2, "PSNR (dB)")):
        a.set_xlabel("SNR per channel symbol (dB)")
        a.set_ylabel(y)
        a.grid(alpha=0.3)
    a1.legend(fontsize=7)
    a1.set_title("TACO (LSF payloads) over 5G LDPC + QAM")
    fig.tight_layout()
    fig.savefig(out / "link.png", dpi=120)
    plt.close(fig)


def build_report(cfg: ExperimentConfig, run_dir: Path, federated: dict) -> dict[str, Any]:
    from rich.progress import Progress

    tally, link_tally, switch = Tally(), {}, {}
    with Progress(transient=True) as progress:
        task = progress.add_task("judging every method on each client", total=cfg.num_clients)
        for pid in range(cfg.num_clients):
            model = restore_client(cfg, run_dir, pid)
            train, test = taco.load_data(cfg, pid, cfg.num_clients)
            # The receiver's fallback for a lost context: the client's mean training image.
            fallback = fallback_image(train.tensors["image"], cfg.data.image_size)
            judge_client(cfg, model, test, tally, link_tally, switch, seed=cfg.seed + pid,
                         fallback=fallback)
            progress.advance(task)
    methods = tally.table()
    clean = link_tally.pop("clean")
    link = [{"channel": ch, "snr_db": s, "mcs": r["mcs"],
             "accuracy": r["correct"] / r["n"], "psnr": r["psnr"] / r["n"],
             "context_lost": r["context_lost"] / r["n"], "task_lost": r["task_lost"] / r["n"],
             "channel_uses_per_image": r["channel_uses"] / r["n"],
             "undetected_bit_error_rate": r["bit_errors"] / max(r["bits"], 1), "images": r["n"]}
            for (ch, s), r in sorted(link_tally.items())]
    return {
        "config": cfg.to_dict(),
        "methods": methods,
        "equal_accuracy": equal_accuracy_ratios(methods),
        "task_switch": switch_summary(switch),
        "link": link,
        "link_error_free": {"accuracy": clean["correct"] / clean["n"],
                            "psnr": clean["psnr"] / clean["n"], "images": clean["n"]},
        "federated_rounds": federated["rounds"],
    }


def switch_summary(switch: dict) -> dict[str, Any] | None:
    """The task switch's IoUs and bytes, or None where it was off (no masks)."""
    if not switch:
        return None
    n = switch["images"]
    iou = {k: switch[f"inter_{k}"] / max(switch[f"union_{k}"], 1)
           for k in ("before", "after", "original", "full_latent")}
    return {"iou_before": iou["before"], "iou_after": iou["after"],
            "iou_on_original": iou["original"], "iou_on_full_latent": iou["full_latent"],
            "first_kb_per_image": switch["first_bytes"] / n / 1000,
            "extra_kb_per_image": switch["extra_bytes"] / n / 1000,
            "repeated_positions": switch["repeated_positions"], "images": n}


def main(argv: list[str] | None = None) -> int:
    args = report_parser("taco", __doc__, "configs/taco_quickstart.yaml").parse_args(argv)
    cfg = report_config(args, lambda c: need(c.workload == "taco", "workload", c.workload,
                                             "'taco' for this report"))
    out = report_folder(args, cfg, "taco")
    ensure_codec(cfg)
    run_dir = out / "federated"
    federated = simulation_run(args.config, args.overrides, run_dir)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    report = build_report(cfg, run_dir, federated)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    table = markdown_table(report) + "\n\n" + link_table(report)
    (out / "report.md").write_text(table + "\n")
    plot(report, out)
    print(table)
    eq, sw = report["equal_accuracy"], report["task_switch"]
    for fmt in ("jpeg", "webp"):
        if eq[fmt] is None:
            print(f"\nno {fmt.upper()} quality reaches TACO LSF's accuracy "
                  f"{eq['taco_lsf_accuracy']:.3f} (best {eq[f'{fmt}_best_accuracy']:.3f})")
        else:
            print(f"\nat equal accuracy: TACO LSF {1000 * eq['taco_lsf_kb']:.1f} B vs. {fmt.upper()} "
                  f"{1000 * eq[fmt]['kb_per_image']:.1f} B (file, ratio {eq[fmt]['ratio_file']:.3f}) / "
                  f"{1000 * eq[fmt]['data_kb_per_image']:.1f} B (data only, ratio "
                  f"{eq[fmt]['ratio_data']:.3f})")
    if sw is None:
        print("\ntask switch: off (the source has no segmentation masks)")
    else:
        print(f"\ntask switch: IoU of the requested segment {sw['iou_before']:.3f} -> "
              f"{sw['iou_after']:.3f} for {1000 * sw['extra_kb_per_image']:.1f} extra B per "
              f"image (first transmission {1000 * sw['first_kb_per_image']:.1f} B; on the "
              f"original {sw['iou_on_original']:.3f}); positions sent twice: "
              f"{sw['repeated_positions']}")
    print(f"results in {out}")
    track_report(cfg, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
