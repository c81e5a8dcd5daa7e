"""`python -m reports.mtsc_paper` at a tiny size: its four federations are trained in
process (the loopback grid, no Ray) into the report folder, where the report finds them
completed and reuses them; it scores them and writes the JSON, the plot and the table.
"Rate off" is trained at the rate that the report derives from "on" (`off_symbols`)."""

import json

import pytest
from test_server_rounds import LoopbackGrid

from common.config import load_config
from fl_server.rounds import run_federated
from reports import mtsc_paper

TINY = ["num_clients=2", "min_train_clients=2", "rounds=1", "data.num_samples=60",
        "train.local_epochs=1", "train.batch_size=16", "device=cpu"]


def test_the_report_reuses_its_runs_and_writes_every_experiment(flower_message_context,
                                                                tmp_path, capsys):
    out = tmp_path / "report"

    def train(name, run_dir, *extra):
        cfg = load_config("configs/mtsc_paper.yaml", [
            *TINY, *mtsc_paper.EXPERIMENTS[name], *extra, f"output_dir={tmp_path}",
            f"client_state_dir={run_dir / 'client-state'}"])
        run_federated(LoopbackGrid(cfg.num_clients), cfg, run_dir)
        return cfg

    for name in ("vqa_fixed", "rate_on", "placement"):
        cfg = train(name, out / name)
        if name == "rate_on":
            k = mtsc_paper.off_symbols(mtsc_paper.snr_points(
                cfg, out / name, mtsc_paper.EVAL_SNRS[name], examples=4))
    train("rate_off", out / f"rate_off_{k}", f"model.jscc_symbols={k}")

    assert mtsc_paper.main(["--out", str(out), "--examples", "4", *TINY]) == 0
    printed = capsys.readouterr().out
    assert printed.count("reusing the completed run") == len(mtsc_paper.EXPERIMENTS)
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.png").stat().st_size > 10_000

    fixed = report["vqa_fixed"]["points"]
    assert [p["snr_db"] for p in fixed] == [0.0, 6.0, 10.0]
    # Fixed compression: every token sends all 16 symbols at every SNR (16 image
    # patches and 8 question tokens).
    assert {p["symbols_per_example"] for p in fixed} == {24 * 16}
    assert all(p["examples"] == 8 and 0 <= p["vqa_bleu"] <= 1 and "cider" not in p
               for p in fixed)
    on, off = report["rate_on"]["points"], report["rate_off"]["points"]
    # Rate on sends more at -2 dB than at 2 dB; off sends its fixed k a token always,
    # the mean of "on" per token over the range.
    assert on[0]["symbols_per_example"] > on[-1]["symbols_per_example"]
    assert report["rate_off"]["jscc_symbols"] == k
    assert {p["symbols_per_example"] for p in off} == {24 * k}
    on_mean = sum(p["symbols_per_example"] for p in on) / len(on)
    assert abs(on_mean - 24 * k) <= 12
    assert all("cider" in p and "vqa_bleu" in p for p in on + off)
    placed = report["placement"]
    for where in ("client", "server"):
        p = placed[where]
        assert p["examples"] == 8 and p["cider"] >= 0 and p["latency_ms_per_example"] > 0
    # Only the server's output crosses the downlink when the client decodes; the server
    # sends the caption's word ids.
    assert placed["client"]["downlink_bytes_per_example"] > \
        10 * placed["server"]["downlink_bytes_per_example"]
    assert placed["server"]["client_ms_per_example"] == 0.0
    assert "| task decoder on |" in printed and "rate_off" in printed


def test_the_report_refuses_another_workload(capsys):
    with pytest.raises(SystemExit) as err:
        mtsc_paper.main(["--config", "configs/distill_quickstart.yaml"])
    assert err.value.code == 2
    assert "'mtsc' for this report" in capsys.readouterr().err
