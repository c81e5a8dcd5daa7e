"""Input reconstruction from split training's uplink, on a finished run.

    python -m reports.inversion --run runs/<id> [--partition 0] [--public 2000] [--epochs 40]

The attack (privacy/inversion.py): the server trains an inversion decoder on what
public images produce through the client's uplink and reads the client's own training
images off what they produce, with and without channel noise and wire compression.
The client comes from a finished run (federated or split: the transmitter and JSCC are
the same modules); the public images are synthetic scenes that no client holds.
Writes `<run>/inversion-client-<p>/inversion.json` and `inversion.png`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from torch import Tensor

from common.data.scenes import HELD_OUT_START, SyntheticScenes
from common.device import resolve_device
from common.records import plt
from models import get_workload
from privacy.inversion import invert
from reports.runs import RunFolderError, finished_run, restore_client


def plot(rows: list[dict[str, Any]], private: Tensor, path: Path, title: str) -> None:
    n = min(8, len(private))
    fig, axes = plt.subplots(len(rows) + 1, n, figsize=(1.3 * n, 1.4 * (len(rows) + 1)),
                             squeeze=False)
    grids = [("client's image", private[:n])] + [
        (f"{r['condition']}\n{r['psnr_db']:.1f} dB", r["examples"][:n]) for r in rows]
    for i, (label, imgs) in enumerate(grids):
        for j in range(n):
            ax = axes[i][j]
            ax.imshow(imgs[j].permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
        axes[i][0].set_ylabel(label, fontsize=6, rotation=0, ha="right", va="center")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reports.inversion",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="the folder of a finished mtsc run")
    parser.add_argument("--partition", type=int, default=0, help="the client attacked")
    parser.add_argument("--public", type=int, default=2000, help="public scenes to train on")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--state-dir", default=None,
                        help="where the clients kept their private state (default: the run's)")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    run = Path(args.run)
    try:
        cfg, _ = finished_run(run)
        if cfg.workload != "mtsc":
            raise RunFolderError(f"--run {run}: workload {cfg.workload!r}; the inversion "
                                 "attack reads mtsc's uplink (its JSCC symbols)")
        if not 0 <= args.partition < cfg.num_clients:
            raise RunFolderError(f"--partition {args.partition}: use 0..{cfg.num_clients - 1}")
        model = restore_client(cfg, run, args.partition,
                               resolve_device(args.device or cfg.device), args.state_dir)
    except RunFolderError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    train, _ = get_workload("mtsc").load_data(cfg, args.partition, cfg.num_clients)
    private = train.tensors["image"]
    first = HELD_OUT_START // 2  # scenes no client, teacher or membership audit uses
    public = SyntheticScenes(cfg.data, np.arange(first, first + args.public)).tensors["image"]
    console.print(f"inversion decoders on {len(public)} public scenes, scored on partition "
                  f"{args.partition}'s {len(private)} training images")
    rows = invert(model, cfg, public, private, args.epochs)
    out = run / f"inversion-client-{args.partition}"
    out.mkdir(exist_ok=True)
    plot(rows, private, out / "inversion.png", f"{run.name}: inversion of the uplink, "
         f"partition {args.partition}")
    for r in rows:
        r.pop("examples")
    (out / "inversion.json").write_text(json.dumps(rows, indent=2))
    print("| condition | inversion PSNR (dB) | mean-image PSNR (dB) |\n|---|---|---|")
    for r in rows:
        print(f"| {r['condition']} | {r['psnr_db']:.2f} | {r['mean_image_psnr_db']:.2f} |")
    console.print(f"wrote {out / 'inversion.json'} and {out / 'inversion.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
