"""reports/separate.py: learned JSCC and the separate baseline compared at equal channel
uses, on a client restored from a finished run."""

import json

import pytest
from test_server_rounds import LoopbackGrid

from common.config import config_from_dict
from fl_server.rounds import run_federated
from reports import separate as report


def test_both_systems_spend_the_same_channel_uses_and_the_cliff_is_found(
        tiny_cfg, flower_message_context, tmp_path):
    run_dir = tmp_path / "run"
    cfg = config_from_dict(tiny_cfg.to_dict(), {"rounds": 1, "num_clients": 2,
                                                "client_state_dir": str(run_dir / "state")})
    run_federated(LoopbackGrid(cfg.num_clients), cfg, run_dir)
    r = report.compare(cfg, run_dir, clients=1, images=6, codecs=["jpeg"],
                       channels=["awgn", "rayleigh"], snrs=[-5.0, 20.0])
    points = {(p["system"], p["channel"], p["snr_db"]): p for p in r["points"]}
    assert len(points) == 8 and all(p["images"] == 6 for p in points.values())
    for (system, ch, snr), p in points.items():
        assert p["symbols_per_image"] == points[("learned", ch, snr)]["symbols_per_image"]
        assert 0 <= p["accuracy"] <= 1 and "ssim" in p and "psnr" in p
    low, high = points[("separate-jpeg", "awgn", -5.0)], points[("separate-jpeg", "awgn", 20.0)]
    # at -5 dB the most robust MCS carries under 20 bytes: no JPEG fits, every image is
    # the fallback; at 20 dB every image arrives over AWGN and is better than the fallback
    assert low["unsent"] == 1.0 and low["delivered"] == 0.0 and low["mcs"] == "QPSK r=0.20"
    assert high["delivered"] == 1.0 and high["quality"] > 1 and high["psnr"] > low["psnr"] + 3
    assert r["cliff_snr_db"]["awgn"]["jpeg"] == 20.0
    report.plot(r, tmp_path / "report.png")
    assert (tmp_path / "report.png").stat().st_size > 10_000
    json.dumps(r)  # the report is plain JSON
    assert "| separate-jpeg | awgn | 20 |" in report.markdown_table(r)


@pytest.mark.parametrize("args, message", [
    (["--fading", "awgn"], "--fading"), (["--clients", "99"], "--clients"),
    (["--config", "configs/taco_quickstart.yaml"], "workload"),
])
def test_bad_arguments_name_the_value_and_the_fix(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as stop:
        report.main([*args, "--out", str(tmp_path)])
    assert stop.value.code == 2 and message in capsys.readouterr().err
