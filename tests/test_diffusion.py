"""The diffusion workload: lossless payloads, the attention mask, DDPM training and
sampling, bytes counted from the Flower messages, the seam's privacy boundary and the
message audit (nothing private leaves a client)."""

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict

from common.config import ConfigError, load_config
from common.data import load_partition, seg_classes
from fl_client.node import PRIVATE_STATE
from fl_client.trust import node_config_of
from fl_server.loop import initial_arrays
from models.diffusion import codec, ddpm, link
from models.diffusion import workload as diffusion
from models.diffusion.model import SegmentationNet
from models.diffusion.pretrain import ensure_pretrained, public_split
from models.diffusion.train import link_metrics
from tests.test_message_audit import ALLOWED_METRICS, _contains, run_client


def tiny_cfg(checkpoint, *extra):
    """16x16 scenes, a small UNet, a few pretraining steps: seconds on a CPU."""
    return load_config("configs/diffusion_quickstart.yaml", [
        "num_clients=3", "data.num_samples=240", "data.image_size=16", "train.batch_size=16",
        "diffusion.block_out_channels=[8, 16, 16]", "diffusion.public_samples=64",
        "diffusion.pretrain_steps=4", "diffusion.baseline_steps=2", "diffusion.sample_steps=4",
        "diffusion.eval_samples=8", "diffusion.private_width=8", "diffusion.private_epochs=1",
        f"diffusion.checkpoint={checkpoint}", *extra])


@pytest.fixture(scope="module")
def cfg(pretrained_dir):
    cfg = tiny_cfg(pretrained_dir / "ddpm-tiny.pt")
    ensure_pretrained(cfg, log=lambda _: None)
    return cfg


# ----------------------------------------------------------------------------- payloads


def test_class_map_payload_round_trips_losslessly_and_codes_runs():
    rng = np.random.default_rng(0)
    maps = [rng.integers(0, 5, (8, 8)), np.zeros((8, 8), int), np.full((16, 16), 4),
            np.repeat(rng.integers(0, 5, (4, 1)), 16, axis=1).reshape(8, 8)]
    for m in maps:
        payload = codec.encode_class_map(m, 5)
        assert np.array_equal(codec.decode_class_map(payload, m.shape[0], 5), m)
    # One run of 64 cells is two bytes (runs of at most 32); a constant 16x16 map is 8.
    assert len(codec.encode_class_map(np.zeros((8, 8), int), 5)) == 2
    assert len(codec.encode_class_map(np.full((16, 16), 4), 5)) == 8
    with pytest.raises(ValueError, match="decodes to"):
        codec.decode_class_map(codec.encode_class_map(maps[0], 5), 4, 5)
    with pytest.raises(ValueError, match="0..4"):
        codec.encode_class_map(np.full((4, 4), 5), 5)


@pytest.mark.parametrize("num_classes, run_bytes", [(9, 2), (256, 2), (300, 3)])
def test_class_maps_of_more_than_eight_classes_code_the_class_in_whole_bytes(num_classes,
                                                                             run_bytes):
    """A real source's masks may hold many classes: the class takes one byte (two above
    256), the run length one more (runs of at most 256 cells)."""
    rng = np.random.default_rng(1)
    m = rng.integers(0, num_classes, (8, 8))
    m[:4] = num_classes - 1  # one run of 32 cells
    payload = codec.encode_class_map(m, num_classes)
    assert np.array_equal(codec.decode_class_map(payload, 8, num_classes), m)
    runs = 1 + int((np.diff(m.ravel()) != 0).sum())
    assert len(payload) == run_bytes * runs
    assert len(codec.encode_class_map(np.zeros((32, 32), int), num_classes)) == 4 * run_bytes
    with pytest.raises(ValueError, match="whole number"):
        codec.decode_class_map(payload[:-1], 8, num_classes)


def test_block_majority_keeps_a_full_block_and_upsampling_restores_its_size():
    seg = torch.zeros(1, 8, 8, dtype=torch.long)
    seg[0, :4, :4] = 3  # one whole 4x4 block
    seg[0, 4:, 4:6] = 2  # half a block: a tie, won by the object
    small = codec.downsample_classes(seg, 4, 5)
    assert small.tolist() == [[[3, 0], [0, 2]]]
    assert codec.upsample_classes(small, 8)[0, :4, :4].eq(3).all()


def test_edge_patches_round_trip_losslessly_and_send_only_non_zero_patches():
    rng = np.random.default_rng(1)
    x = (rng.random((32, 32)) < 0.05).astype(np.float32)
    x[:16] = 0  # the top half has no edges: its patches must not be sent
    payload = codec.encode_edge_patches(x, 4)
    assert np.array_equal(codec.decode_edge_patches(payload, 32, 4), x)
    tiles = codec.to_patches(torch.from_numpy(x), 4)
    sent = int((tiles.sum(1) > 0).sum())
    assert codec.patch_count(payload) == sent
    assert len(payload) == 2 + 2 * sent + (sent * 16 + 7) // 8
    empty = codec.encode_edge_patches(np.zeros((32, 32)), 4)
    assert len(empty) == 2 and not codec.decode_edge_patches(empty, 32, 4).any()


def test_edge_map_marks_object_boundaries_one_pixel_thick():
    image = torch.full((1, 3, 16, 16), 0.05)
    image[:, :, 4:12, 4:12] = 0.9  # a bright square
    edges = codec.edge_map(image, threshold=0.5)[0]
    assert edges[8, 2:6].sum() >= 1 and edges[8, 10:14].sum() >= 1  # left and right sides
    assert edges[7:9, 7:9].sum() == 0 and edges[0:2].sum() == 0  # flat inside and outside
    assert (edges[8].sum() <= 4)  # thin: non-maximum suppression, not a band


def test_x_att_is_zero_outside_the_mask_and_patches_never_rise_with_tau(cfg):
    model = diffusion.build(cfg)
    _, test = diffusion.load_data(cfg, 0, cfg.num_clients)
    image = test.tensors["image"][:8]
    requested = test.tensors["label"][:8]
    cam = link.cam_attention(model.classifier, image, requested)
    assert cam.shape == (8, 16, 16) and cam.min() >= 0 and cam.max() <= 1
    edges = codec.edge_map(image, cfg.diffusion.edge_threshold)
    counts = []
    for tau in (0.0, 0.2, 0.4, 0.6, 0.8, 0.95):
        mask = codec.attention_mask(cam, tau)
        x_att = mask * edges
        assert (x_att[mask == 0] == 0).all() and (x_att <= edges).all()
        counts.append(sum(codec.patch_count(codec.encode_edge_patches(x.numpy(), 4)) for x in x_att))
    assert all(a >= b for a, b in zip(counts, counts[1:])), counts
    assert counts[0] > counts[-1]  # the mask does cut patches


# ----------------------------------------------------------------------------- DDPM


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
def test_ddpm_training_lowers_the_denoising_loss(cfg, prediction):
    """The same fixed batch, noise and timesteps before and after 60 AdamW steps, for
    each prediction target."""
    cfg = tiny_cfg(cfg.diffusion.checkpoint, f"diffusion.prediction_type={prediction}")
    torch.manual_seed(0)
    unet = ddpm.make_unet(cfg, 3 + ddpm.cond_channels(cfg))
    sched = ddpm.noise_scheduler(cfg.diffusion)
    data = public_split(cfg)
    image, seg = data.tensors["image"][:32], data.tensors["segmentation"][:32]
    cond = ddpm.training_conditions(image, seg, cfg.diffusion, torch.Generator().manual_seed(0),
                                    seg_classes(cfg.data))

    def fixed_loss():
        with torch.no_grad():
            return ddpm.denoising_loss(unet, image, cond, sched, torch.Generator().manual_seed(1)).item()

    before = fixed_loss()
    opt = torch.optim.AdamW(unet.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(2)
    for _ in range(60):
        loss = ddpm.denoising_loss(unet, image, cond, sched, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = fixed_loss()
    assert after < 0.6 * before, (before, after)


def test_ddim_sampling_with_a_fixed_seed_repeats(cfg):
    model = diffusion.build(cfg)
    seg = torch.randint(0, 5, (2, 16, 16))
    cond = ddpm.conditions(seg, torch.zeros(2, 16, 16), 5)
    a = ddpm.ddim_sample(model.unet, cond, cfg, seed=3)
    b = ddpm.ddim_sample(model.unet, cond, cfg, seed=3)
    c = ddpm.ddim_sample(model.unet, cond, cfg, seed=4)
    assert a.shape == (2, 3, 16, 16) and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


# ----------------------------------------------------------------------------- link


def test_bytes_counted_equal_the_bytes_in_the_messages(cfg):
    model = diffusion.build(cfg)
    _, test = diffusion.load_data(cfg, 1, cfg.num_clients)
    image = test.tensors["image"][:6]
    result = link.three_phase_link(model, image, cfg, tau=0.3, mode="cam", seed=0)
    for kind, n_msgs in ((link.PHASE1, 6), (link.FEEDBACK, 6), (link.PHASE3, 6)):
        msgs = result.messages[kind]
        assert len(msgs) == n_msgs and all(m.metadata.message_type == kind for m in msgs)
        # Independently: every byte of every record of every message.
        in_messages = sum(len(v) for m in msgs for rec in m.content.config_records.values()
                          for v in rec.values())
        assert not any(m.content.array_records or m.content.metric_records for m in msgs)
        assert result.nbytes(kind) == in_messages
    # The phase-1 bytes are the transmitter's run-length code, re-encoded here.
    with torch.no_grad():
        seg = codec.downsample_classes(model.seg_net(image).argmax(1), cfg.diffusion.seg_downsample,
                                       5)
    assert result.nbytes(link.PHASE1) == sum(len(codec.encode_class_map(s.numpy(), 5)) for s in seg)
    assert torch.equal(result.seg_small, seg)
    assert result.nbytes(link.FEEDBACK) == 6  # one class byte per image
    # The receiver's x_att is what the transmitter masked, decoded from the messages.
    assert torch.equal(result.x_att, torch.stack([torch.from_numpy(codec.decode_edge_patches(
        link.message_payload(m), 16, 4)) for m in result.messages[link.PHASE3]]))
    metrics = diffusion.evaluate(model, test, cfg)
    n = metrics["num-examples"]
    assert metrics["rate_phase1"] == pytest.approx(8 * metrics["bytes_phase1"] / (3 * 16 * 16 * 8))
    assert n == min(len(test), cfg.diffusion.eval_samples)


def test_over_the_physical_layer_blocks_arrive_or_are_known_lost(cfg):
    from models.digital_phy import MCS_TABLE, bytes_to_bits, channel_uses, select_mcs

    model = diffusion.build(cfg)
    _, test = diffusion.load_data(cfg, 1, cfg.num_clients)
    image = test.tensors["image"][:4]
    clean = link.three_phase_link(model, image, cfg, tau=0.3, mode="all", seed=0)
    assert not clean.lost[link.PHASE1].any() and not clean.channel_uses.any()
    g = torch.Generator().manual_seed(0)
    good = link.three_phase_link(model, image, cfg, tau=0.3, mode="all", seed=0,
                                 link=link.DigitalLink("awgn", 20.0, "auto", g))
    assert not good.lost[link.PHASE1].any() and not good.lost[link.PHASE3].any()
    for name in ("seg_small", "x_att", "recon1", "recon3"):  # as over the error-free link
        assert torch.equal(getattr(good, name), getattr(clean, name)), name
    expected = [sum(channel_uses(n, select_mcs("auto", 20.0, n)) for n in (
        len(bytes_to_bits(link.message_payload(m1))), len(bytes_to_bits(link.message_payload(m3)))))
        for m1, m3 in zip(good.messages[link.PHASE1], good.messages[link.PHASE3])]
    assert good.channel_uses.tolist() == expected
    bad = link.three_phase_link(model, image, cfg, tau=0.3, mode="all", seed=0,
                                link=link.DigitalLink("awgn", -10.0, len(MCS_TABLE) - 1, g))
    assert bad.lost[link.PHASE1].all() and bad.lost[link.PHASE3].all()
    # erasures, not garbage: an all-background map and no edges at the receiver
    assert not bad.seg_small.any() and not bad.x_att.any()


def test_all_edges_send_at_least_the_cam_patches_and_seg_only_sends_none(cfg):
    model = diffusion.build(cfg)
    _, test = diffusion.load_data(cfg, 0, cfg.num_clients)
    image = test.tensors["image"][:6]
    first = link.run_phase1(model, image, cfg, seed=0)
    runs = {mode: link.three_phase_link(model, image, cfg, 0.5, mode, seed=0, phase1=first)
            for mode in ("none", "cam", "all")}
    assert runs["none"].patches() == 0 and not runs["none"].x_att.any()
    assert runs["cam"].patches() <= runs["all"].patches()
    assert torch.equal(runs["all"].x_att, codec.edge_map(image, cfg.diffusion.edge_threshold))
    assert torch.equal(runs["cam"].recon1, runs["all"].recon1)  # phases 1-2 shared


# ----------------------------------------------------------------------------- seam, config


def test_shared_state_is_only_the_unets_lora_adapters_and_loads_back(cfg):
    model = diffusion.build(cfg)
    shared = diffusion.shared_state(model)
    assert shared and all(k.startswith("unet.") and ".lora_" in k for k in shared)
    assert set(diffusion.shared_state(model, "b")) == {k for k in shared if ".lora_B." in k}
    bumped = {k: v + 1.0 for k, v in shared.items()}
    diffusion.load_shared_state(model, bumped)
    assert all(np.allclose(diffusion.shared_state(model)[k], v) for k, v in bumped.items())
    with pytest.raises(KeyError, match="keys this UNet does not"):
        diffusion.load_shared_state(model, {"seg_net.net.out.weight": np.zeros(1)})


def test_config_errors_name_the_key(tmp_path):
    for override, key in (("strategy.name=fedavg", "strategy.name"),
                          ("lora.target_modules=[q_proj]", "lora.target_modules"),
                          ("diffusion.seg_downsample=5", "diffusion.seg_downsample"),
                          ("diffusion.tau=1.5", "diffusion.tau"),
                          ("diffusion.prediction_type=x0", "diffusion.prediction_type"),
                          ("diffusion.private_epochs=-1", "diffusion.private_epochs")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            tiny_cfg(tmp_path / "x.pt", override)


def test_a_checkpoint_made_for_other_settings_is_refused(cfg):
    other = tiny_cfg(cfg.diffusion.checkpoint, "diffusion.pretrain_steps=5")
    with pytest.raises(ValueError, match="diffusion.pretrain_steps"):
        diffusion.build(other)


def _foreground_iou(pred, seg):
    """Mean IoU over the object classes present (background left out)."""
    ious = [((pred == c) & (seg == c)).sum().item() / ((pred == c) | (seg == c)).sum().item()
            for c in range(1, codec.SEG_CLASSES) if ((pred == c) | (seg == c)).any()]
    return sum(ious) / len(ious)


def test_private_epochs_teach_the_segmentation_net_the_objects(cfg):
    """With only the joint pass the transmitter's net stays near background; the
    private-net passes lift its object IoU on the client's test scenes well above
    that (measured here, 16x16, private_lr 0.01: 0.07 -> 0.19 after 30 passes; 32x32
    client 0, 30 epochs at 0.002: 0.25; all background: 0.0)."""
    train, test = diffusion.load_data(cfg, 0, cfg.num_clients)
    image, seg = test.tensors["image"], test.tensors["segmentation"]
    scores = {}
    for epochs in (0, 30):
        c = tiny_cfg(cfg.diffusion.checkpoint, f"diffusion.private_epochs={epochs}",
                     "diffusion.private_lr=0.01")
        model = diffusion.build(c)
        diffusion.train_local(model, train, c, seed=0)
        model.seg_net.eval()
        with torch.no_grad():
            scores[epochs] = _foreground_iou(model.seg_net(image).argmax(1), seg)
    assert scores[30] > scores[0] + 0.08, scores


@pytest.fixture(scope="module")
def x0_cfg(tmp_path_factory):
    """An x_0-predicting DDPM (400 pretraining steps, 16x16, 4x4 class map: ~20 s) that
    follows its conditions, shared by the phase-3 gain tests."""
    cfg = tiny_cfg(tmp_path_factory.mktemp("x0") / "x0.pt", "diffusion.prediction_type=sample",
                   "diffusion.pretrain_steps=400", "diffusion.public_samples=400",
                   "diffusion.pretrain_lr=0.003", "diffusion.seg_downsample=4",
                   "diffusion.private_epochs=20", "diffusion.private_lr=0.005")
    ensure_pretrained(cfg, log=lambda _: None)
    return cfg


def test_phase3_edges_raise_the_requested_class_iou_over_phase1(x0_cfg):
    """The DDPM regenerates held-out scenes from their phase-1 map alone and again with
    the requested class's edges (inside its dilated mask, as a CAM region); a
    segmentation net trained on real images scores the requested class on both.
    Measured: IoU 0.30 in phase 1, 0.42 with the edges; the stated margin is +0.05."""
    cfg = x0_cfg
    unet = diffusion.build(cfg).unet.eval()  # LoRA B = 0: exactly the pretrained UNet
    train, test = load_partition(cfg.data, 0, cfg.num_clients)
    torch.manual_seed(0)
    net = SegmentationNet(8, codec.SEG_CLASSES)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for _ in range(30):
        for b in torch.utils.data.DataLoader(train, batch_size=16, shuffle=True):
            loss = torch.nn.functional.cross_entropy(net(b["image"]), b["segmentation"])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    image, seg = test.tensors["image"][:32], test.tensors["segmentation"][:32]
    present = torch.nn.functional.one_hot(seg.long(), codec.SEG_CLASSES).flatten(1, 2).amax(1)
    requested = present[:, 1:].argmax(1) + 1  # one object class of each scene
    seg_full = codec.upsample_classes(codec.downsample_classes(seg, 4, codec.SEG_CLASSES), 16)
    region = (seg == requested[:, None, None]).float()[:, None]
    region = torch.nn.functional.max_pool2d(region, 3, stride=1, padding=1)[:, 0]
    x_att = codec.edge_map(image, cfg.diffusion.edge_threshold) * region

    def iou(x_att):
        recon = ddpm.ddim_sample(unet, ddpm.conditions(seg_full, x_att, codec.SEG_CLASSES), cfg,
                                 seed=1)
        with torch.no_grad():
            got = net(recon).argmax(1) == requested[:, None, None]
        target = seg == requested[:, None, None]
        return ((got & target).sum() / (got | target).sum()).item()

    phase1, phase3 = iou(torch.zeros_like(x_att)), iou(x_att)
    assert phase3 > phase1 + 0.05, (phase1, phase3)


def test_phase3_raises_the_requested_class_iou_through_the_whole_link(x0_cfg):
    """The whole link on one node's nets: its transmitter's segmentation net sends
    x_seg, its receiver regenerates, requests a class and scores it with its task net;
    phase 3 sends all edges or the CAM-masked ones (tau 0.2). The node's private nets
    learn from every partition's training scenes (192; 1 joint + 20 private passes
    each), scored on every test scene (47), 16x16. Measured (IoU phase 1 -> phase 3):
    all edges 0.158 -> 0.213, CAM 0.158 -> 0.222 at 84% of the bytes; with other
    training and noise seeds 0.138 -> 0.215 and 0.138 -> 0.178. Stated margins: +0.03
    for all edges, +0.02 for the CAM."""
    cfg = x0_cfg
    model = diffusion.build(cfg)
    for pid in range(cfg.num_clients):
        diffusion.train_local(model, diffusion.load_data(cfg, pid, cfg.num_clients)[0], cfg, seed=pid)
    tests = [diffusion.load_data(cfg, pid, cfg.num_clients)[1] for pid in range(cfg.num_clients)]
    batch = {k: torch.cat([t.tensors[k] for t in tests]) for k in ("image", "segmentation",
                                                                    "depth", "label")}
    first = link.run_phase1(model, batch["image"], cfg, seed=1)
    gains = {mode: link_metrics([(link.three_phase_link(model, batch["image"], cfg, 0.2, mode,
                                                        seed=1, phase1=first), batch, model)],
                                cfg)["iou_gain"] for mode in ("all", "cam")}
    assert gains["all"] > 0.03 and gains["cam"] > 0.02, gains


# ----------------------------------------------------------------------------- message audit


@pytest.mark.parametrize("lora_train", ["ab", "b"])
def test_diffusion_sends_adapters_but_no_label_mask_depth_image_or_private_net(
        cfg, flower_message_context, lora_train):
    audit_client_replies(cfg, lora_train)


def audit_client_replies(cfg, lora_train, node_private=None):
    """Train and evaluate one client through the ClientApp; no reply may carry a label,
    mask, depth map, image or private tensor (also `node_private`: the node's other
    tensors, such as a local CLIP), only the UNet's adapters and allowed metrics."""
    node_config = {"partition-id": 1, "num-partitions": 3, **node_config_of(cfg)}
    context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                      run_config={})
    arrays = initial_arrays(cfg, lora_train)
    train_reply = run_client(cfg, lora_train, "train", context, arrays)
    eval_reply = run_client(cfg, lora_train, "evaluate", context, arrays)

    saved = context.state.array_records[PRIVATE_STATE]
    private = {n: a.numpy() for n, a in saved.items() if ".lora_" not in n}
    assert {n.split(".")[0] for n in private} == {"seg_net", "classifier", "task_net"}
    private.update(node_private or {})
    train_ds, test_ds = load_partition(cfg.data, 1, 3)
    secrets = {f"{s}.{k}": ds.tensors[k].numpy().astype(np.float32)
               for s, ds in (("train", train_ds), ("test", test_ds))
               for k in ("label", "image", "segmentation", "depth")}
    expected = set(diffusion.shared_state(diffusion.build(cfg), lora_train))
    allowed = ALLOWED_METRICS | set(diffusion.TRAIN_METRICS) | set(diffusion.EVAL_METRICS)
    for reply in (train_reply, eval_reply):
        content = reply.content
        assert not content.config_records, "a client sends no ConfigRecord"
        for record in content.metric_records.values():
            assert set(record) <= allowed, set(record) - allowed
            assert all(isinstance(v, (int, float)) for v in record.values())
        for record in content.array_records.values():
            assert set(record) == expected
            for key, arr in record.items():
                values = arr.numpy()
                assert key.startswith("unet.") and ".lora_" in key
                for name, secret in private.items():
                    assert not (secret.shape == values.shape and np.allclose(secret, values)), \
                        f"{key} equals private tensor {name}"
                    if secret.size >= 16:
                        assert not _contains(values, secret.ravel()[:16]), f"{key} carries {name}"
                for name, secret in secrets.items():
                    assert not _contains(values, secret.ravel()[:16]), f"{key} carries {name}"
    assert not eval_reply.content.array_records, "evaluation replies carry metrics only"
    assert len(train_reply.content.array_records) == 1
    # The private nets did train on the node (so the audit compared trained tensors).
    fresh = diffusion.build(cfg)
    head = "task_net.class_head.2.weight"
    assert not np.allclose(private[head], dict(fresh.named_parameters())[head].detach().numpy())
