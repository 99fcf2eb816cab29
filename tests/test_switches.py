"""
The ablation switches (config.ABLATIONS): deepstack, text.mrope_layout, video_time. The defaults are the paper's and
compute the reference's numbers; each other value changes exactly what it names, matches the reference it comes from
(Qwen2-VL's chunked frequency layout, Qwen2.5-VL's absolute-time positions), is kept by our checkpoints and refused
by a Hugging Face export; train.py's --arch sets them, strictly parsed.
"""
import dataclasses
import json
import types
from functools import partial

import numpy as np
import pytest
import torch
from conftest import IMG, VE, VID, VS, make_batch, reference_inputs
from test_model import CASES, compare

import train
from config import ABLATIONS, Qwen3VLConfig, parse_arch, read_hf_config
from model import Qwen3VL, prompt_positions
from processor import Processor
from rope import mrope_cos_sin, rope_frequencies, rope_index
from tokenizer import Tokenizer

SWITCHED = {"deepstack": dict(deepstack=False), "chunked": dict(text=dict(mrope_layout="chunked")),
            "text": dict(text=dict(mrope_layout="text")), "trope": dict(video_time="trope"),
            "none": dict(video_time="none")}


def with_switches(model, text=None, **overrides):
    """A model of `model`'s config with the switches changed (text: TextConfig fields) and the same weights (those
    it still has)."""
    cfg = dataclasses.replace(model.cfg, text=dataclasses.replace(model.cfg.text, **(text or {})), **overrides)
    new = Qwen3VL(cfg).eval()
    new.load_state_dict({k: v for k, v in model.state_dict().items() if k in new.state_dict()}, strict=True)
    return new


def logits(model, kw, **extra):
    with torch.no_grad():
        return model(**kw, **extra)[0]


# ---------------------------------------------------------------------------------------------------------- defaults

def test_defaults_are_the_paper():
    cfg = Qwen3VLConfig()
    assert (cfg.deepstack, cfg.text.mrope_layout, cfg.video_time) == (True, "interleaved", "timestamps")
    assert cfg.ablations() == {} and set(ABLATIONS) == {"deepstack", "text.mrope_layout", "video_time"}
    assert Processor(None).video_time == "timestamps"
    field = {"deepstack": "deepstack", "chunked": "text.mrope_layout", "text": "text.mrope_layout",
             "trope": "video_time", "none": "video_time"}
    for name, over in SWITCHED.items():
        assert list(Qwen3VLConfig.from_preset("toy-cpu", **over).ablations()) == [field[name]], name


def test_default_model_matches_reference(pair):
    """The paper's switches, written out, give the reference's logits and positions."""
    ref, ours = pair
    explicit = with_switches(ours, deepstack=True, video_time="timestamps", text=dict(mrope_layout="interleaved"))
    kw = make_batch(CASES["padded_mixed_batch"])
    err, _, _ = compare(ref, explicit, kw)
    assert err <= 1e-5, err
    assert torch.equal(logits(explicit, kw), logits(ours, kw))
    pos, _ = prompt_positions(explicit.cfg, kw["input_ids"], kw["attention_mask"], kw["image_grid_thw"],
                              kw["video_grid_thw"])
    ref_pos, _ = ref.model.get_rope_index(kw["input_ids"], reference_inputs(kw)["mm_token_type_ids"],
                                          kw["image_grid_thw"], kw["video_grid_thw"], kw["attention_mask"])
    real = kw["attention_mask"].bool()
    assert torch.equal(pos[:, real], ref_pos[:, real])


# ---------------------------------------------------------------------------------------------------------- deepstack

def test_deepstack_off_builds_no_mergers(pair):
    _, ours = pair
    off = with_switches(ours, deepstack=False)
    assert not any("deepstack" in n for n, _ in off.named_parameters())
    ds = sum(p.numel() for n, p in ours.named_parameters() if "deepstack_merger_list" in n)
    assert ds > 0 and off.num_params() == ours.num_params() - ds


def test_deepstack_off_equals_zeroed_features(pair):
    """Off: the model whose DeepStack features are all zero (its mergers' last layer zeroed), bitwise; text alone
    is unchanged, visual tokens are."""
    _, ours = pair
    off = with_switches(ours, deepstack=False)
    zeroed = with_switches(ours)
    with torch.no_grad():
        for merger in zeroed.visual.deepstack_merger_list:
            merger.linear_fc2.weight.zero_()
            merger.linear_fc2.bias.zero_()
    kw = make_batch(CASES["padded_mixed_batch"])
    assert torch.equal(logits(off, kw), logits(zeroed, kw))
    assert (logits(off, kw) - logits(ours, kw)).abs().max() > 1e-3
    text = make_batch(CASES["text"])
    assert torch.equal(logits(off, text), logits(ours, text))


# ---------------------------------------------------------------------------------------------------------- MRoPE

def test_chunked_layout_matches_qwen2_vl_reference():
    """Qwen2-VL's rotary embedding (transformers) on random 3-D positions (t, h, w all different): the same cos / sin,
    so each frequency slot turns with the reference's axis (t for the first 24, h for the next 20, w for the last)."""
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding
    g = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 3000, (3, 2, 9), generator=g)
    cfg = Qwen2VLTextConfig(hidden_size=1024, num_attention_heads=8, rope_parameters=dict(
        rope_type="default", rope_theta=5e6, mrope_section=[24, 20, 20]))
    ref_cos, ref_sin = Qwen2VLRotaryEmbedding(cfg)(torch.zeros(1, dtype=torch.float32), pos)
    cos, sin = mrope_cos_sin(pos, rope_frequencies(128, 5e6), [24, 20, 20], "chunked")
    torch.testing.assert_close(cos, ref_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, ref_sin, rtol=0, atol=1e-6)


def test_chunked_layout_changes_only_visual_rows(pair):
    _, ours = pair
    chunked = with_switches(ours, text=dict(mrope_layout="chunked"))
    text = make_batch(CASES["text"])
    assert torch.equal(logits(chunked, text), logits(ours, text))     # t = h = w: every layout is 1-D RoPE
    kw = make_batch(CASES["one_image"])
    assert (logits(chunked, kw) - logits(ours, kw)).abs().max() > 1e-4


def test_text_layout_is_plain_rope(pair):
    """'text': every real token at its index among the real tokens (padding 1), all rows equal, and the model equals
    the paper's model given those 1-D positions: plain RoPE."""
    _, ours = pair
    flat = with_switches(ours, text=dict(mrope_layout="text"))
    kw = make_batch(CASES["padded_mixed_batch"] + [[("text", 1)]])          # the last row: one token, padded
    mask = kw["attention_mask"]
    pos, delta = prompt_positions(flat.cfg, kw["input_ids"], mask, kw["image_grid_thw"], kw["video_grid_thw"])
    expected = (mask.cumsum(1) - 1).masked_fill(mask == 0, 1)                                      # [B, S]
    assert torch.equal(pos, expected[None].expand(3, -1, -1))
    assert delta.tolist() == [[int(mask[b].sum()) - mask.shape[1]] for b in range(len(mask))]
    assert torch.equal(logits(flat, kw), logits(ours, kw, position_ids=expected))
    assert (logits(flat, kw) - logits(ours, kw)).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------------------- video time

def qwen25_rope_index(kw, second_per_grid):
    """transformers' Qwen2.5-VL get_rope_index (tokens_per_second 2, merge 2) on our inputs."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
    fake = types.SimpleNamespace(
        config=types.SimpleNamespace(vision_config=types.SimpleNamespace(spatial_merge_size=2, tokens_per_second=2)),
        get_vision_position_ids=partial(Qwen2_5_VLModel.get_vision_position_ids, None))
    return Qwen2_5_VLModel.get_rope_index(fake, kw["input_ids"], reference_inputs(kw)["mm_token_type_ids"],
                                          kw.get("image_grid_thw"), kw.get("video_grid_thw"), second_per_grid,
                                          kw["attention_mask"])


def trope_row(parts):
    """ids of a row in Qwen2.5-VL's layout: each video one block of all its frame groups, no timestamps."""
    ids = []
    for kind, arg in parts:
        if kind == "text":
            ids += list(range(100, 100 + arg))
        else:
            t, h, w = arg
            ids += [VS] + [IMG if kind == "image" else VID] * (t * h * w // 4) + [VE]
    return ids


def test_trope_positions_match_qwen25_reference():
    """Two left-padded rows with images and videos of fractional seconds per frame group (truncated times)."""
    rows = [[("text", 3), ("video", (3, 16, 16)), ("text", 2), ("image", (1, 4, 6)), ("text", 4)],
            [("text", 2), ("video", (2, 12, 8)), ("text", 5), ("video", (4, 8, 16)), ("text", 1)]]
    seconds = torch.tensor([0.75, 1.0, 0.6])
    ids = [trope_row(r) for r in rows]
    S = max(map(len, ids))
    kw = dict(input_ids=torch.tensor([[151643] * (S - len(r)) + r for r in ids]),
              attention_mask=torch.tensor([[0] * (S - len(r)) + [1] * len(r) for r in ids]),
              image_grid_thw=torch.tensor([[1, 4, 6]]), video_grid_thw=torch.tensor([[3, 16, 16], [2, 12, 8], [4, 8, 16]]))
    cfg = Qwen3VLConfig.from_preset("toy-cpu", video_time="trope", image_token_id=IMG, video_token_id=VID,
                                    vision_start_token_id=VS, vision_end_token_id=VE, text=dict(vocab_size=151936))
    pos, delta = prompt_positions(cfg, kw["input_ids"], kw["attention_mask"], kw["image_grid_thw"],
                                  kw["video_grid_thw"], seconds)
    ref_pos, ref_delta = qwen25_rope_index(kw, seconds)
    real = kw["attention_mask"].bool()
    assert torch.equal(pos[:, real], ref_pos[:, real])
    assert torch.equal(delta, ref_delta - (~real).sum(1, keepdim=True))       # ours against the padded length
    first = pos[0, 0, 4:4 + 64 * 3].view(3, 64)                                    # row 0's video: 3 groups of 8x8
    assert first[:, 0].tolist() == [4, 5, 7]                 # 4 + (0, 1.5, 3.0) truncated: Qwen2.5-VL's times
    assert torch.equal(pos[:, 0, 4:4 + 64], pos[:, 0, 4 + 64:4 + 128] - torch.tensor([1, 0, 0])[:, None])


def test_trope_text_resumes_after_the_last_time():
    """A video whose times reach past its grid: the next text starts after the largest position (as 4.57 and
    Qwen2-VL; transformers 5 would resume at start + max(h', w') inside the video's times)."""
    ids = torch.tensor([trope_row([("text", 2), ("video", (4, 4, 4)), ("text", 2)])])
    pos, delta = rope_index(ids, None, None, torch.tensor([[4, 4, 4]]), image_token_id=IMG, video_token_id=VID,
                            video_second_per_grid=torch.tensor([2.0]))
    assert pos[0, 0, 3:3 + 16:4].tolist() == [3, 7, 11, 15]         # groups every 2 s x 2 positions per second
    assert pos[:, 0, -3:].tolist() == [[16, 17, 18]] * 3             # <|vision_end|> and the text after it
    assert delta.tolist() == [[19 - ids.shape[1]]]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_pretrained(None)


def video_chat(frames=8):
    video = np.random.default_rng(0).integers(0, 255, (frames, 64, 64, 3), dtype=np.uint8)
    return [{"role": "user", "content": [{"type": "video", "video": video, "fps": 2.0},
                                         {"type": "text", "text": "What happens?"}]}]


@pytest.mark.parametrize("video_time", ["timestamps", "trope", "none"])
def test_processor_writes_video_time(tok, video_time):
    b = Processor(tok, video_min_pixels=64 * 64 * 8, video_time=video_time)(video_chat(), return_text=True)
    text, (t, h, w) = b["text"][0], b["video_grid_thw"][0].tolist()
    assert t == 4 and ("seconds>" in text) == (video_time == "timestamps")
    assert text.count("<|vision_start|>") == (1 if video_time == "trope" else t)
    assert (b["input_ids"] == tok.video_token_id).sum() == t * h * w // 4
    assert b["video_second_per_grid"].tolist() == [1.0]             # frames at 2 fps, 2 per group


def test_trope_model_reads_the_seconds(tok):
    cfg = Qwen3VLConfig.from_preset("toy-cpu", video_time="trope", image_token_id=tok.image_token_id,
                                    video_token_id=tok.video_token_id, vision_start_token_id=tok.vision_start_id,
                                    vision_end_token_id=tok.vision_end_id, text=dict(vocab_size=151936))
    model = Qwen3VL(cfg).eval()
    model.init_weights()
    b = Processor(tok, video_min_pixels=64 * 64 * 8, video_time="trope")(video_chat())
    b.pop("labels")
    with pytest.raises(ValueError, match="video_time='trope' needs video_second_per_grid"):
        model(**dict(b, video_second_per_grid=None))
    slow = logits(model, dict(b, video_second_per_grid=b["video_second_per_grid"] * 4))
    assert (logits(model, b) - slow).abs().max() > 1e-5              # the seconds move the frames in time
    stamped = Processor(tok, video_min_pixels=64 * 64 * 8)(video_chat())
    stamped.pop("labels")
    with pytest.raises(ValueError, match=r"must be one run per video \(video_time='trope'\) \(1 from"):
        model(**stamped)


# ---------------------------------------------------------------------------------------------------------- files

@pytest.mark.parametrize("name", SWITCHED)
def test_hf_export_refuses_and_our_files_keep_the_switches(pair, name, tmp_path):
    _, ours = pair
    model = with_switches(ours, **SWITCHED[name])
    (key, value), = model.cfg.ablations().items()
    for fmt in ("v4", "v5"):
        with pytest.raises(ValueError, match=rf"^{key}={value!r}: a Hugging Face checkpoint holds the paper's"):
            model.save_pretrained(tmp_path / "hf", format=fmt)
    assert not (tmp_path / "hf").exists()                           # refused before anything is written
    for fmt in ("v4", "v5"):
        d = json.loads(json.dumps(model.cfg.to_hf_dict(fmt, ablations=True)))
        assert d["ablations"] == {key: value}
        assert Qwen3VLConfig.from_hf_dict(d) == model.cfg


def test_mrope_interleaved_key_maps_to_the_layout():
    d = Qwen3VLConfig.from_preset("toy-cpu").to_hf_dict("v4")
    assert d["text_config"]["rope_scaling"]["mrope_interleaved"] is True and "ablations" not in d
    d["text_config"]["rope_scaling"]["mrope_interleaved"] = False
    assert Qwen3VLConfig.from_hf_dict(d).text.mrope_layout == "chunked"
    d["ablations"] = {"text.mrope_layout": "text"}
    with pytest.raises(ValueError, match="ablations says text.mrope_layout='text', but the RoPE settings' "
                                         "mrope_interleaved is False"):
        Qwen3VLConfig.from_hf_dict(d)
    d["ablations"] = {"deepstak": False}
    with pytest.raises(ValueError, match=r"unknown ablations key\(s\) \['deepstak'\]"):
        Qwen3VLConfig.from_hf_dict(d)


def test_config_refuses_bad_switches():
    for over, error in ((dict(deepstack=0), (TypeError, "deepstack=0: must be True or False")),
                        (dict(video_time="seconds"), (ValueError, "video_time='seconds': must be one of timestamps, "
                                                                  "trope, none")),
                        (dict(text=dict(mrope_layout="3d")), (ValueError, "text.mrope_layout='3d': must be one of")),
                        (dict(video_time="trope", text=dict(mrope_layout="text")),
                         (ValueError, "1-D positions have no time axis"))):
        with pytest.raises(error[0], match=error[1].replace("(", r"\(")):
            Qwen3VLConfig.from_preset("toy-cpu", **over)


# ---------------------------------------------------------------------------------------------------------- train.py

def test_parse_arch():
    assert parse_arch("deepstack=false,text.mrope_layout=chunked,video_time=trope,vision.depth=2,"
                      "text.rope_theta=1e4") == dict(deepstack=False, video_time="trope", vision=dict(depth=2),
                                                     text=dict(mrope_layout="chunked", rope_theta=1e4))
    assert parse_arch("") == {}


@pytest.mark.parametrize("arch, error", [
    ("deepstak=false", "unknown key 'deepstak'"),
    ("text.deepstack=false", "unknown key 'text.deepstack'"),
    ("deepstack=no", "deepstack='no': must be true or false"),
    ("vision.depth=2.5", "vision.depth='2.5': must be a whole number"),
    ("text.mrope_layout=spiral", "text.mrope_layout='spiral': must be one of interleaved, chunked, text"),
    ("video_time=trope,text.mrope_layout=text", "1-D positions have no time axis"),
    ("text.mrope_section=8", "text.mrope_section: a list field, which --arch does not set"),
    ("text.vocab_size=512", "text.vocab_size: set by the run's tokenizer"),
    ("deepstack=true,deepstack=false", "deepstack: given twice"),
    ("deepstack", "'deepstack': must be KEY=VALUE"),
])
def test_arch_flag_errors(arch, error, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--arch", arch])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"--arch {arch}: " in err and error in err, err


def test_arch_with_init_from_is_refused(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--arch", "deepstack=false", "--init_from", "some/checkpoint"])
    assert "the architecture is the checkpoint's" in capsys.readouterr().err


@pytest.mark.parametrize("video_time", ["trope", "none"])
def test_make_processor_follows_video_time(tok, video_time, tmp_path):
    args = train.parse_args(["--arch", f"video_time={video_time}"])
    cfg = Qwen3VLConfig.from_preset("toy-cpu", video_time=video_time)
    assert train.make_processor(args, None, tok, types.SimpleNamespace(budgets={}), cfg).video_time == video_time
    Processor(tok).save_pretrained(tmp_path)                               # a checkpoint's processor files
    assert train.make_processor(args, str(tmp_path), tok, None, cfg).video_time == video_time


def test_checkpoint_keeps_the_switches(tmp_path, tok):
    """A toy run with --arch: its checkpoint's config holds the switches, loads back as that model (no DeepStack
    mergers), its processor follows video_time, there is no HF export, and a resume asking for another value stops."""
    out = tmp_path / "o"
    arch = "deepstack=false,text.mrope_layout=chunked,video_time=none"
    train.main(["--vocab_size", "400", "--batch_size", "1", "--seq_len", "128", "--eval_samples", "0",
                "--test_samples", "1", "--max_new_tokens", "2", "--stages", "align:1", "--eval_every", "0",
                "--arch", arch, "--out_dir", str(out)])
    ckpt = train.latest_checkpoint(str(out))
    cfg = read_hf_config(ckpt)
    assert cfg.ablations() == {"deepstack": False, "text.mrope_layout": "chunked", "video_time": "none"}
    model = train.load_trained(ckpt)
    assert model.cfg == cfg and len(model.visual.deepstack_merger_list) == 0
    assert not (out / "hf").exists()
    from sample import load_processor
    assert load_processor(str(out))[2].video_time == "none"
    with pytest.raises(ValueError, match="--arch deepstack=True: the resumed checkpoint .* has deepstack=False"):
        train.main(["--vocab_size", "400", "--stages", "align:2", "--out_dir", str(out), "--resume",
                    "--arch", "deepstack=true"])
