"""reports/separate.py: learned JSCC and the separate baseline compared at equal channel
uses, on a client restored from a finished run."""

import json

import pytest
import torch
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


def test_taco_sends_its_lsf_payloads_over_the_link_at_the_baselines_channel_uses(
        flower_message_context, tmp_path, pretrained_dir):
    from test_restore_client import tiny_taco_cfg

    run_dir = tmp_path / "run"
    _check_a_digital_learned_system(tiny_taco_cfg(pretrained_dir, tmp_path, run_dir, "rounds=1"),
                                    run_dir)


def test_diffusion_sends_its_phase_payloads_over_the_link_at_the_baselines_channel_uses(
        flower_message_context, tmp_path, pretrained_dir):
    from test_diffusion import tiny_cfg as diffusion_cfg

    from models.diffusion.pretrain import ensure_pretrained

    run_dir = tmp_path / "run"
    cfg = diffusion_cfg(pretrained_dir / "ddpm-tiny.pt", "rounds=1", "num_clients=2",
                        f"client_state_dir={run_dir / 'client-state'}")
    ensure_pretrained(cfg, log=lambda _: None)
    _check_a_digital_learned_system(cfg, run_dir)


def _check_a_digital_learned_system(cfg, run_dir):
    """TACO and diffusion send bytes: their learned system crosses the same LDPC link,
    loses blocks as the baseline does, and sets the baseline's budget image by image."""
    run_federated(LoopbackGrid(cfg.num_clients), cfg, run_dir)
    r = report.compare(cfg, run_dir, clients=1, images=4, codecs=["jpeg"],
                       channels=["awgn", "rayleigh"], snrs=[-5.0, 20.0])
    points = {(p["system"], p["channel"], p["snr_db"]): p for p in r["points"]}
    assert len(points) == 8 and all(p["images"] == 4 for p in points.values())
    for (system, ch, snr), p in points.items():
        # the baseline's budget is the learned system's channel uses, image by image
        assert p["symbols_per_image"] == points[("learned", ch, snr)]["symbols_per_image"]
        assert p["symbols_per_image"] > 0
        assert 0 <= p["accuracy"] <= 1 and "psnr" in p and "ssim" in p
        assert 0 <= p["lost"] <= 1
        if system == "learned":
            assert p["delivered"] + p["lost"] == pytest.approx(1)
        else:
            assert p["delivered"] + p["unsent"] + p["lost"] == pytest.approx(1)
    top = points[("learned", "awgn", 20.0)]
    assert top["lost"] == 0.0 and top["psnr"] > 0
    assert "| learned | awgn | 20 |" in report.markdown_table(r)
    json.dumps(r)  # the report is plain JSON


@pytest.mark.parametrize("args, message", [
    (["--fading", "awgn"], "--fading"), (["--clients", "99"], "--clients"),
    (["--images", "0"], "--images"),
])
def test_bad_arguments_name_the_value_and_the_fix(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as stop:
        report.main([*args, "--out", str(tmp_path)])
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_a_folder_that_is_no_finished_run_is_refused_with_the_fix(capsys, tmp_path):
    assert report.main(["--run", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "no metrics.json there" in capsys.readouterr().err


def test_lpips_is_scored_only_where_its_backbone_weights_are_at_hand(monkeypatch, tmp_path):
    import torch
    import torchvision

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    report._lpips.cache_clear()
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    try:
        assert "lpips" not in report.image_quality(images, images)
        # any AlexNet state dict at torchvision's cache path (here a random one: the
        # check is the wiring, not the score's meaning); nothing is downloaded
        report.lpips_backbone().parent.mkdir(parents=True)
        torch.save(torchvision.models.alexnet(weights=None).state_dict(), report.lpips_backbone())
        report._lpips.cache_clear()
        same = report.image_quality(images, images)["lpips"]
        other = report.image_quality(images, images.roll(1, 0))["lpips"]
        assert same.shape == (3,) and torch.allclose(same, torch.zeros(3), atol=1e-6)
        assert (other > same).all()
    finally:
        report._lpips.cache_clear()


def test_small_images_get_ssim_and_a_three_scale_ms_ssim_large_ones_the_full_one():
    from reports.separate import image_quality

    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 32, 32, generator=g)
    small, noisy = image_quality(x, x), image_quality(
        (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1), x)
    assert set(small) >= {"psnr", "ssim", "ms_ssim_3"} and "ms_ssim" not in small
    assert torch.allclose(small["ms_ssim_3"], torch.ones(6))
    assert (noisy["ms_ssim_3"] < 0.99).all() and (noisy["ssim"] < 0.99).all()
    big = image_quality(torch.rand(1, 3, 176, 176, generator=g), torch.rand(1, 3, 176, 176))
    assert "ms_ssim" in big and "ms_ssim_3" not in big
