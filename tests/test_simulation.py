"""End to end on Flower's Ray-backed simulation runtime: 3 clients x 2 rounds."""

import functools
import json

import pytest

from common.config import load_config
from fl_client.client_app import make_app
from models.mtsc import workload as mtsc
from simulation.run import simulate
from tests.actor_probe import probe as actor_probe

pytestmark = pytest.mark.engine  # real Flower or Ray processes (tests/conftest.py)


@pytest.mark.timeout(300)
def test_ray_simulation_learns_and_writes_results(tmp_path):
    cfg = load_config("configs/quickstart.yaml", [
        "num_clients=3", "rounds=2", "data.num_samples=300", "train.local_epochs=2",
        f"output_dir={tmp_path}",
    ])
    adapter_bytes = sum(v.nbytes for v in mtsc.shared_state(mtsc.build(cfg)).values())
    probe = tmp_path / "probe.jsonl"
    results = simulate(cfg, tmp_path / "run",
                       client_app=make_app(mods=[functools.partial(actor_probe, str(probe))]))
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["status"] == "completed"
    assert saved["config"]["num_clients"] == 3
    rounds = saved["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[1]["train_loss"] < rounds[0]["train_loss"]
    for r in rounds:
        for key in ("train_loss", "accuracy", "vqa_accuracy", "bleu", "psnr",
                    "bytes_up", "bytes_down"):
            assert key in r, key
        assert r["clients_accepted"] == 3
        # Only the adapters travel, both ways.
        assert r["bytes_up"] == r["bytes_down"] == adapter_bytes
    assert (tmp_path / "run" / "metrics.png").stat().st_size > 10_000
    assert (tmp_path / "run" / "global_adapters.npz").is_file()
    assert results["rounds"] == rounds
    # The actors started warm (simulation/warm.py): peft, which the workload imports,
    # was there before any message; one torch thread each, as their one CPU.
    seen = [json.loads(line) for line in probe.read_text().splitlines()]
    assert len(seen) >= 12  # 3 clients x 2 rounds x (train + evaluate)
    assert all(s["peft"] for s in seen), seen
    assert {s["threads"] for s in seen} == {1}
