"""What goes on the wire: LoRA upload bytes against the full model's, and int8 split
compression (bytes and what it costs in accuracy after a fixed training budget).

    python benchmarks/wire.py [--rounds 3] [--steps 8]

Measured numbers, not a test.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.config import load_config
from models import get_workload

# The layer sizes of BART-base (facebook/bart-base: d_model 768, 6 encoder and 6
# decoder layers, 12 heads, FFN 3072), built from the config with random weights; the
# vocabulary stays the synthetic scenes' own.
BART_BASE = ["model.d_model=768", "model.layers=6", "model.heads=12", "model.ffn_dim=3072"]


def lora_bytes(name: str, overrides: list[str]) -> dict:
    """Bytes a client uploads per round (the LoRA adapters, `shared_state`) against
    the bytes of every parameter of the model it holds (what full-model FedAvg sends)."""
    cfg = load_config(ROOT / "configs/quickstart.yaml", ["device=cpu", *overrides])
    workload = get_workload(cfg.workload)
    model = workload.build(cfg, "cpu")
    lora = sum(v.nbytes for v in workload.shared_state(model).values())
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"model": name, "parameters": sum(p.numel() for p in model.parameters()),
            "lora_upload_bytes": lora, "full_model_bytes": full, "ratio": lora / full}


def int8_compression(rounds: int = 3, steps: int = 8, clients: int = 2) -> dict:
    """The split experiment (configs/split_quickstart.yaml, smaller) trained for the
    same budget (rounds x steps per client) with float32 and with int8 activations and
    gradients: bytes per step and the last round's task metrics of each."""
    from simulation.run import simulate

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for codec in ("none", "int8"):
            cfg = load_config(ROOT / "configs/split_quickstart.yaml", [
                f"rounds={rounds}", f"num_clients={clients}", f"min_train_clients={clients}",
                "data.num_samples=800", f"split.steps_per_round={steps}",
                f"split.compression={codec}", f"output_dir={tmp}", "device=cpu"])
            last = simulate(cfg, Path(tmp) / codec)["rounds"][-1]
            out[codec] = {k: last.get(k) for k in (
                "accuracy", "vqa_accuracy", "bleu", "psnr", "train_loss",
                "bytes_up_per_step", "bytes_down_per_step")}
    per_step = {c: out[c]["bytes_up_per_step"] + out[c]["bytes_down_per_step"] for c in out}
    return {"rounds": rounds, "steps_per_round": steps, "clients": clients,
            "float32": out["none"], "int8": out["int8"],
            "bytes_ratio": per_step["int8"] / per_step["none"],
            "accuracy_change": out["int8"]["accuracy"] - out["none"]["accuracy"],
            "psnr_change_db": out["int8"]["psnr"] - out["none"]["psnr"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    print(json.dumps(lora_bytes("quickstart", [])))
    print(json.dumps(lora_bytes("BART-base-sized", BART_BASE)))
    print(json.dumps(int8_compression(args.rounds, args.steps)))


if __name__ == "__main__":
    main()
