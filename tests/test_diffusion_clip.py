"""The diffusion workload's CLIP path: free-text feedback over the link and CLIP
attention at the transmitter, on a tiny random CLIP written locally (no download, no
real CLIP: these tests check the plumbing, not the quality of the attention)."""

import re
import socket
import string

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from common.config import ConfigError
from common.data.scenes import CLASSES, COLORS
from fl_client.trust import NODE_KEYS, Refused, node_experiment
from models.diffusion import clip_attention as ca
from models.diffusion import codec, feedback, link
from models.diffusion import workload as diffusion
from models.diffusion.pretrain import ensure_pretrained
from tests.test_diffusion import audit_client_replies, tiny_cfg

PROMPT = re.compile(rf"a( ({'|'.join(COLORS)}))? ({'|'.join(CLASSES)})")


def write_tiny_clip(folder):
    """A random CLIP (2 layers, width 32, 32x32 input, 8x8 patches) with a
    character-level CLIP tokenizer over a-z, saved as save_pretrained writes a real one."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:  # a letter inside a word, and at its end
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=32,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32},
                       crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def ddpm_file(pretrained_dir):
    path = pretrained_dir / "ddpm-tiny.pt"  # tests/test_diffusion.py's, when on one worker
    ensure_pretrained(tiny_cfg(path), log=lambda _: None)
    return path


def clip_cfg(ddpm_file, clip_dir, *extra):
    return tiny_cfg(ddpm_file, f"diffusion.clip_checkpoint={clip_dir}",
                    "diffusion.attention=clip", *extra)


def test_text_feedback_round_trips_through_the_message_and_counts_its_utf8_bytes(
        ddpm_file, clip_dir, flower_message_context):
    cfg = clip_cfg(ddpm_file, clip_dir, "diffusion.feedback=text")
    model = diffusion.build(cfg)
    _, test = diffusion.load_data(cfg, 0, cfg.num_clients)
    image = test.tensors["image"][:6]
    first = link.run_phase1(model, image, cfg, seed=0)
    requested, texts = feedback.receiver_request(model, first.recon1, first.seg_small)
    assert torch.equal(first.requested, requested)
    assert all(PROMPT.fullmatch(t) for t in texts), texts
    assert [f"a {CLASSES[c]}" for c in requested.tolist()] == [re.sub(r" \w+ ", " ", t)
                                                               for t in texts]
    result = link.three_phase_link(model, image, cfg, tau=0.5, mode="clip", seed=0, phase1=first)
    msgs = result.messages[link.FEEDBACK]
    assert [link.message_payload(m).decode("utf-8") for m in msgs] == texts
    # The transmitter attended to what the messages say, and the bytes are theirs.
    assert result.prompts == texts
    in_messages = sum(len(v) for m in msgs for rec in m.content.config_records.values()
                      for v in rec.values())
    assert result.nbytes(link.FEEDBACK) == in_messages == sum(len(t.encode("utf-8")) for t in texts)
    # Any UTF-8 prompt survives the link byte for byte.
    text = "ein roter Kreis \u00fcber dem Quadrat"
    msg = link.link_message(link.FEEDBACK, feedback.encode_text(text), link.RECEIVER,
                            link.TRANSMITTER)
    assert feedback.decode_text(link.message_payload(msg)) == text
    assert link.message_bytes([msg]) == len(text.encode("utf-8")) == len(text) + 1
    with pytest.raises(UnicodeDecodeError):
        feedback.decode_text(b"\xff\xfe")


def test_prompts_name_the_class_and_the_nearest_scene_colour():
    assert feedback.prompt(0, "red") == "a red circle" and feedback.prompt(3) == "a cross"
    for name, rgb in COLORS.items():
        assert feedback.nearest_colour(torch.tensor(rgb) * 0.95) == name
    assert feedback.decode_class(feedback.encode_class(2)) == 2
    with pytest.raises(ValueError, match="one byte"):
        feedback.decode_class(bytes([len(CLASSES)]))


def test_the_receiver_asks_for_the_main_class_of_its_map_in_the_colour_it_sees():
    """Image 0's received map holds a circle over 3 cells and a cross over 1: the receiver
    asks for the circle, in the colour of those pixels of its reconstruction. Image 1's
    map holds no object: it asks for its task net's class (a square), without a colour
    (the map puts no pixel there)."""
    class TaskNet(torch.nn.Module):
        def forward(self, recon):
            b, _, s, _ = recon.shape
            logits = torch.tensor([[0, 0, 0, 5.0], [0, 5.0, 0, 0]])
            return torch.zeros(b, codec.SEG_CLASSES, s, s), torch.ones(b, s, s), logits

    model = torch.nn.Module()
    model.task_net = TaskNet()
    seg_small = torch.zeros(2, 4, 4, dtype=torch.long)
    seg_small[0, 0, :3] = 1  # class 0 (seg id 1): three cells
    seg_small[0, 3, 3] = 4  # class 3: one cell
    recon = torch.zeros(2, 3, 8, 8)
    recon[0, :, :2, :6] = torch.tensor(COLORS["green"])[:, None, None]
    requested, texts = feedback.receiver_request(model, recon, seg_small)
    assert requested.tolist() == [0, 1] and texts == ["a green circle", "a square"]


def test_clip_attention_is_a_normalised_map_that_depends_on_the_text(ddpm_file, clip_dir):
    cfg = clip_cfg(ddpm_file, clip_dir)
    _, test = diffusion.load_data(cfg, 0, cfg.num_clients)
    image = test.tensors["image"][:6]
    clip = ca.load_clip(str(clip_dir))
    a = ca.clip_attention(clip, image, ["a red circle"] * 6)
    b = ca.clip_attention(clip, image, ["a blue square"] * 6)
    assert a.shape == b.shape == (6, 16, 16)
    for m in (a, b):
        assert m.min() >= 0 and m.max() <= 1
        assert torch.allclose(m.amax((1, 2)), torch.ones(6), atol=1e-4)  # min-max normalised
    assert ((a - b).abs().amax((1, 2)) > 0.05).all(), (a - b).abs().amax((1, 2))
    # One prompt per image: a batch of mixed prompts gives each image its own map.
    mixed = ca.clip_attention(clip, image, ["a red circle", "a blue square"] * 3)
    assert torch.allclose(mixed[0::2], a[0::2], atol=1e-5)
    assert torch.allclose(mixed[1::2], b[1::2], atol=1e-5)


def test_clip_x_att_is_zero_outside_the_mask_and_patches_never_rise_with_tau(
        ddpm_file, clip_dir, flower_message_context):
    """Class feedback with CLIP attention: the transmitter phrases the class itself."""
    cfg = clip_cfg(ddpm_file, clip_dir)
    model = diffusion.build(cfg)
    _, test = diffusion.load_data(cfg, 0, cfg.num_clients)
    image = test.tensors["image"][:8]
    first = link.run_phase1(model, image, cfg, seed=0)
    assert link.message_bytes(first.feedback) == 8  # one class byte per image
    edges = codec.edge_map(image, cfg.diffusion.edge_threshold)
    attention = ca.clip_attention(ca.load_clip(str(clip_dir)), image,
                                  [feedback.prompt(c) for c in first.requested.tolist()])
    counts = []
    for tau in (0.0, 0.2, 0.4, 0.6, 0.8, 0.95):
        result = link.three_phase_link(model, image, cfg, tau, "clip", seed=0, phase1=first)
        assert result.prompts == [feedback.prompt(c) for c in first.requested.tolist()]
        mask = codec.attention_mask(attention, tau)
        assert torch.equal(result.x_att, mask * edges)  # what the receiver decoded
        assert (result.x_att[mask == 0] == 0).all() and (result.x_att <= edges).all()
        counts.append(result.patches())
    assert all(a >= b for a, b in zip(counts, counts[1:])), counts
    assert counts[0] > counts[-1]  # the mask does cut patches


def test_clip_config_errors_name_their_key(ddpm_file, clip_dir):
    for extra, key, fix in ((["diffusion.attention=clip"], "diffusion.attention",
                             "set 'diffusion.clip_checkpoint'"),
                            (["diffusion.feedback=text"], "diffusion.feedback",
                             "set 'diffusion.clip_checkpoint'"),
                            (["diffusion.attention=gradcam"], "diffusion.attention", "'cam'"),
                            (["diffusion.feedback=label"], "diffusion.feedback", "'text'"),
                            ([f"diffusion.clip_checkpoint={clip_dir}", "diffusion.feedback=text"],
                             "diffusion.feedback", "diffusion.attention='clip'")):
        with pytest.raises(ConfigError, match=rf"config key '{re.escape(key)}'") as err:
            tiny_cfg(ddpm_file, *extra)
        assert fix in str(err.value), str(err.value)


def test_a_missing_or_unreadable_clip_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "none"))):
        ca.load_clip(str(tmp_path / "none"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "empty"))):
        ca.load_clip(str(tmp_path / "empty"))


def test_loading_and_attention_touch_no_network(clip_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    ca._load.cache_clear()  # a real load, not the cached one
    clip = ca.load_clip(str(clip_dir))
    maps = ca.clip_attention(clip, torch.rand(2, 3, 16, 16), ["a red circle", "a cross"])
    assert maps.shape == (2, 16, 16)


def test_the_clip_path_sends_no_label_mask_image_private_net_or_clip_weight(
        ddpm_file, clip_dir, flower_message_context, monkeypatch):
    cfg = clip_cfg(ddpm_file, clip_dir, "diffusion.feedback=text")
    calls = []
    real = link.clip_attention
    monkeypatch.setattr(link, "clip_attention",
                        lambda *a: calls.append(a[2]) or real(*a))
    clip = ca.load_clip(str(clip_dir))
    clip_weights = {f"clip.{n}": p.detach().numpy() for n, p in clip.model.named_parameters()
                    if p.numel() >= 16}
    audit_client_replies(cfg, "ab", clip_weights)
    assert calls and all(PROMPT.fullmatch(t) for texts in calls for t in texts)  # CLIP ran


def test_the_clip_directory_is_the_nodes_to_choose(ddpm_file, clip_dir, flower_message_context):
    """A server cannot point a node at a folder; with CLIP attention asked for and no
    node copy, the node refuses and names its node config key."""
    def sent(cfg):
        return Message(RecordDict({"config": ConfigRecord({"experiment": cfg.to_json()})}),
                       dst_node_id=7, message_type="train")

    def node(config):
        return Context(run_id=1, node_id=7, node_config=config, state=RecordDict(), run_config={})

    assert NODE_KEYS["diffusion.clip_checkpoint"] == ca.NODE_KEY  # the key errors name
    plain = tiny_cfg(ddpm_file, "diffusion.clip_checkpoint=/server/clip")
    assert node_experiment(sent(plain), node({})).diffusion.clip_checkpoint == ""
    cfg = node_experiment(sent(plain), node({"diffusion-clip-checkpoint": str(clip_dir)}))
    assert cfg.diffusion.clip_checkpoint == str(clip_dir)
    with pytest.raises(Refused, match="diffusion-clip-checkpoint"):
        node_experiment(sent(clip_cfg(ddpm_file, "/server/clip")), node({}))


def test_the_report_adds_clip_rows_beside_the_cam_sweep(ddpm_file, clip_dir, tmp_path,
                                                        flower_message_context):
    """The report's sweep on clients saved as a run leaves them: with a local CLIP and
    text feedback it adds one CLIP row per tau, whose feedback is the prompts' bytes,
    while the CAM rows still get the class byte."""
    import json

    import numpy as np

    from models.client_state import local_parameters
    from reports import diffusion as report

    cfg = clip_cfg(ddpm_file, clip_dir, "diffusion.feedback=text", "diffusion.tau_sweep=[0.3, 0.6]",
                   "diffusion.tau=0.3", "diffusion.eval_samples=4")
    run_dir = tmp_path / "run"
    model = diffusion.build(cfg)
    for pid in range(cfg.num_clients):
        folder = run_dir / "client-state" / run_dir.name / f"partition-{pid}"
        folder.mkdir(parents=True)
        np.savez(folder / "round-1.npz",
                 **{n: p.detach().numpy() for n, p in local_parameters(model).items()})
    np.savez(run_dir / "global_adapters.npz", **diffusion.shared_state(model))
    (run_dir / "metrics.json").write_text(json.dumps({"status": "completed",
                                                      "config": cfg.to_dict()}))
    with torch.no_grad():
        results, _, probes = report.sweep(cfg, run_dir, "cpu")
    names = [r["method"] for r in report.rows_of(results)]
    assert "CLIP attention, text feedback, tau=0.3" in names
    assert "CLIP attention, text feedback, tau=0.6" in names
    clip_row, cam_row = (results["CLIP attention, text feedback, tau=0.3"],
                         results["CAM edges, tau=0.3"])
    assert cam_row["bytes_feedback"] == 1.0
    assert clip_row["bytes_feedback"] >= len("a cross")
    assert clip_row["iou_phase1"] == cam_row["iou_phase1"]  # the same phase 1
    assert "CLIP attention, text feedback, tau=0.3" in report.markdown(
        report.rows_of(results), report.goal(results, cfg), probes)
    report.plot_tradeoff(results, cfg, tmp_path / "report.png")
