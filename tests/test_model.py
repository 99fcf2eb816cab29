"""model.py against the reference Qwen3VLForConditionalGeneration (tiny, random, fp32, CPU): whole-model logits and
loss on text, images, video and padded mixed batches; checkpoints both ways; presets; errors."""
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import build_pair, make_batch, reference_inputs, short_of_image_features

from config import HF_FORMATS, HF_HARMLESS_KEYS, Qwen3VLConfig, hf_format_of, read_hf_config
from model import Qwen3VL

CASES = {
    "text": [[("text", 24)]],
    "one_image": [[("text", 5), ("image", (1, 4, 6)), ("text", 7)]],
    "images_of_different_sizes": [[("text", 3), ("image", (1, 4, 6)), ("text", 2), ("image", (1, 8, 4)),
                                   ("image", (1, 2, 2)), ("text", 4)]],
    "video": [[("text", 3), ("video", (3, 4, 4)), ("text", 5)]],
    "padded_mixed_batch": [[("text", 3), ("image", (1, 4, 6)), ("video", (2, 4, 4)), ("text", 5)],
                           [("text", 4), ("image", (1, 2, 2)), ("text", 2)]],
}


def compare(ref, ours, kw, labels=None):
    with torch.no_grad():
        r = ref(**reference_inputs(kw), labels=labels)
        logits, loss = ours(**kw, labels=labels)
    m = kw["attention_mask"].bool()                     # padding rows are not outputs of either model
    return (logits[m] - r.logits[m]).abs().max().item(), r, loss


@pytest.mark.parametrize("case", CASES)
def test_logits_match_reference(pair, case):
    ref, ours = pair
    err, _, _ = compare(ref, ours, make_batch(CASES[case]))
    assert err <= 1e-5, err


def test_loss_matches_reference(pair):
    ref, ours = pair
    kw = make_batch(CASES["padded_mixed_batch"])
    labels = kw["input_ids"].masked_fill(kw["attention_mask"] == 0, -100)
    labels[:, 1:][kw["attention_mask"][:, :-1] == 0] = -100   # no target predicted from a padding position
    _, r, loss = compare(ref, ours, kw, labels)
    torch.testing.assert_close(loss, r.loss, rtol=0, atol=1e-5)


def test_left_padding_does_not_change_a_row(pair):
    _, ours = pair
    rows = CASES["padded_mixed_batch"]
    both = make_batch(rows)
    n = int(both["attention_mask"][1].sum())
    alone = dict(input_ids=both["input_ids"][1:, -n:], attention_mask=both["attention_mask"][1:, -n:],
                 pixel_values=both["pixel_values"][24:], image_grid_thw=both["image_grid_thw"][1:])  # row 0's image: 24 patches
    with torch.no_grad():
        a, _ = ours(**both)
        b, _ = ours(**alone)
    torch.testing.assert_close(a[1, -n:], b[0], rtol=0, atol=1e-5)


def test_tied_embeddings_match_reference(tmp_path):
    ref, ours = build_pair(tmp_path, tie=True, seed=1)
    assert ours.lm_head.weight is ours.language_model.embed_tokens.weight
    err, _, _ = compare(ref, ours, make_batch(CASES["one_image"]))
    assert err <= 1e-5, err


@pytest.mark.parametrize("format", ["v5", "v4"])
def test_save_pretrained_loads_in_reference(pair, tmp_path, format):
    """ours.from_pretrained(ref dir) -> ours.save_pretrained -> reference.from_pretrained: identical logits."""
    from transformers import Qwen3VLForConditionalGeneration
    ref, ours = pair
    ours.save_pretrained(tmp_path / "ours", format=format)
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["transformers_version"] == HF_FORMATS[format]
    assert ("rope_parameters" if format == "v5" else "rope_scaling") in written["text_config"]
    ref2 = Qwen3VLForConditionalGeneration.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    kw = make_batch(CASES["padded_mixed_batch"])
    with torch.no_grad():
        a, b = ref(**reference_inputs(kw)).logits, ref2(**reference_inputs(kw)).logits
    assert torch.equal(a, b)
    ours2 = Qwen3VL.from_pretrained(tmp_path / "ours")
    assert all(torch.equal(p, q) for p, q in zip(ours.state_dict().values(), ours2.state_dict().values()))


def test_sharded_checkpoint_round_trip(pair, tmp_path):
    _, ours = pair
    ours.save_pretrained(tmp_path / "sharded", max_shard_bytes=8 * 2**20)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    again = Qwen3VL.from_pretrained(tmp_path / "sharded")
    kw = make_batch(CASES["one_image"])
    with torch.no_grad():
        assert torch.equal(ours(**kw)[0], again(**kw)[0])


PUBLISHED = {"qwen3-vl-2b": 2_127_532_032, "qwen3-vl-4b": 4_437_815_808,
             "qwen3-vl-8b": 8_767_123_696, "qwen3-vl-32b": 33_357_390_064}


@pytest.mark.parametrize("name", PUBLISHED)
def test_preset_parameter_counts(name):
    with torch.device("meta"):
        model = Qwen3VL(Qwen3VLConfig.from_preset(name))
    assert model.num_params() == PUBLISHED[name]


def test_preset_equals_reference_config_count():
    """Our 8B config written as config.json builds the same parameter count in the reference."""
    from transformers import Qwen3VLConfig as HFConfig, Qwen3VLForConditionalGeneration
    cfg = HFConfig(**Qwen3VLConfig.from_preset("qwen3-vl-8b").to_hf_dict())
    with torch.device("meta"):
        ref = Qwen3VLForConditionalGeneration(cfg)
    assert sum(p.numel() for p in ref.parameters()) == PUBLISHED["qwen3-vl-8b"]


# ---- errors --------------------------------------------------------------------------------------------

def test_missing_directory_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Qwen3VL.from_pretrained(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps(Qwen3VLConfig.from_preset("toy-cpu").to_hf_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="pickle files are never loaded"):
        Qwen3VL.from_pretrained(tmp_path)


def test_wrong_checkpoint_is_named(pair, tmp_path):
    _, ours = pair
    ours.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["text_config"]["num_hidden_layers"] = 4            # a checkpoint of another size
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"missing \['language_model.layers.3"):
        Qwen3VL.from_pretrained(tmp_path)
    cfg["text_config"]["num_hidden_layers"] = 3
    cfg["text_config"]["intermediate_size"] = 100
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="mlp.down_proj.weight' has shape"):
        Qwen3VL.from_pretrained(tmp_path)


def test_corrupt_safetensors(pair, tmp_path):
    _, ours = pair
    ours.save_pretrained(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read safetensors file"):
        Qwen3VL.from_pretrained(tmp_path)


# ---- config.json: both generations of the format ------------------------------------------------------

FIXTURES = Path(__file__).parent / "fixtures" / "v4_configs"      # written by transformers 4.57.6 (make_v4_configs.py)
RELEASED = {"Qwen3-VL-2B": "qwen3-vl-2b", "Qwen3-VL-4B": "qwen3-vl-4b", "Qwen3-VL-8B": "qwen3-vl-8b",
            "Qwen3-VL-32B": "qwen3-vl-32b", "Qwen3-VL-30B-A3B": "qwen3-vl-30b-a3b",
            "Qwen3-VL-235B-A22B": "qwen3-vl-235b-a22b"}
V4_FILES = sorted(FIXTURES.glob("*.json"))


def assert_written_like(ours, theirs, where="config.json"):
    """Every key we write is in `theirs` with the same value (sub-configs key by key); whatever else they write
    is a key listed as harmless. Not compared: text_config.tie_word_embeddings, which we always write with the
    model's value, 4.57 leaves out when False and 5.x writes without reading it (test_which_flag_ties_the_head)."""
    for key, value in ours.items():
        if key == "transformers_version" or f"{where}.{key}" == "config.json.text_config.tie_word_embeddings":
            continue
        assert key in theirs, f"{where}.{key}"
        if key.endswith("_config"):
            assert_written_like(value, theirs[key], f"{where}.{key}")
        else:
            assert theirs[key] == value, (f"{where}.{key}", value, theirs[key])
    assert set(theirs) - set(ours) <= set(HF_HARMLESS_KEYS), (where, set(theirs) - set(ours))


def test_v4_fixtures_cover_every_released_size():
    assert len(V4_FILES) == 12
    assert {f.stem.rsplit("-", 1)[0] for f in V4_FILES} == set(RELEASED)
    assert {f.stem.rsplit("-", 1)[1] for f in V4_FILES} == {"Instruct", "Thinking"}


@pytest.mark.parametrize("file", V4_FILES, ids=lambda f: f.stem)
def test_config_json_of_both_generations(file, tmp_path):
    """A 4.57 file reads as our preset; our "v4" export is that file; transformers 5 reads the same file and writes
    it in the 5.x format, which reads as the same preset again and equals our "v5" export."""
    from transformers import AutoConfig
    preset = Qwen3VLConfig.from_preset(RELEASED[file.stem.rsplit("-", 1)[0]])
    v4 = json.loads(file.read_text())
    assert Qwen3VLConfig.from_hf_dict(v4, where=file.name) == preset
    assert_written_like(preset.to_hf_dict("v4"), v4)
    (tmp_path / "config.json").write_text(file.read_text())
    v5 = json.loads(AutoConfig.from_pretrained(tmp_path).to_json_string())
    assert hf_format_of(v5) == "v5" and "rope_parameters" in v5["text_config"]
    assert Qwen3VLConfig.from_hf_dict(v5) == preset
    assert_written_like(preset.to_hf_dict("v5"), v5)


@pytest.mark.parametrize("name", ["qwen3-vl-2b", "qwen3-vl-8b", "qwen3-vl-30b-a3b", "toy-cpu"])
@pytest.mark.parametrize("format", ["v5", "v4"])
def test_hf_config_round_trip(name, format):
    cfg = Qwen3VLConfig.from_preset(name)
    d = json.loads(json.dumps(cfg.to_hf_dict(format)))
    assert hf_format_of(d) == format and Qwen3VLConfig.from_hf_dict(d) == cfg


def edit(**changes):
    """A change to a config.json dict: section "top", "text_config", "vision_config" or a rope dict -> updates;
    a value of DROP removes the key."""
    def apply(d):
        for where, update in changes.items():
            section = {"top": d, "text_config": d["text_config"], "vision_config": d["vision_config"],
                       "text_rope": d["text_config"].get("rope_parameters"),
                       "vision_rope": d["vision_config"].get("rope_parameters")}[where]
            for k, v in update.items():
                section.pop(k) if v is DROP else section.update({k: v})
        return d
    return apply


DROP = object()
BAD_CONFIGS = {   # (preset, format, edit, the error after the file's name)
    "typo": ("toy-cpu", "v5", edit(text_config={"hiden_size": 3}),
             r"unknown text_config key\(s\) \['hiden_size'\]"),
    "typo_at_top": ("toy-cpu", "v4", edit(top={"image_token": 3}), r"unknown top-level key\(s\) \['image_token'\]"),
    "other_model": ("toy-cpu", "v5", edit(top={"model_type": "llama"}),
                    "model_type is 'llama'; expected 'qwen3_vl' or 'qwen3_vl_moe'"),
    "future_version": ("toy-cpu", "v5", edit(top={"transformers_version": "6.0.0"}),
                       r"transformers_version is '6\.0\.0'; the config.json formats read here are transformers "
                       r"4\.57\.x \(Qwen3-VL's first\) and 5\.x"),
    "old_version": ("toy-cpu", "v4", edit(top={"transformers_version": "4.45.2"}), r"transformers_version is '4\.45\.2'"),
    "longrope": ("toy-cpu", "v5", edit(text_rope={"rope_type": "longrope", "factor": 3.0}),
                 r"text\.rope_scaling: rope_type 'longrope' is not implemented; supported: default \(rope_scaling "
                 r"None\), linear, yarn"),
    "rope_key": ("toy-cpu", "v5", edit(text_rope={"factor": 3.0}),
                 r"unknown text_config\.rope_parameters key\(s\) \['factor'\]; known: rope_type, rope_theta"),
    "no_theta": ("toy-cpu", "v5", edit(text_rope={"rope_theta": DROP}), "text_config has no rope_theta"),
    "no_theta_v4": ("toy-cpu", "v4", edit(text_config={"rope_theta": DROP}), "text_config has no rope_theta"),
    "both_ropes": ("toy-cpu", "v5", edit(text_config={"rope_scaling": {"rope_type": "default"}}),
                   r"text_config holds both rope_scaling \(transformers 4\.57\) and rope_parameters \(5\.x\)"),
    "two_thetas": ("toy-cpu", "v5", edit(text_config={"rope_theta": 1e6}),
                   r"text_config\.rope_theta \(1000000\.0\) and text_config\.rope_parameters\.rope_theta "
                   r"\(10000\.0\) disagree"),
    "activation": ("toy-cpu", "v4", edit(text_config={"hidden_act": "gelu"}), "text_config.hidden_act must be 'silu'"),
    "dropout": ("toy-cpu", "v4", edit(text_config={"attention_dropout": 0.1}), "text_config.attention_dropout must be 0.0"),
    "vision_rope": ("toy-cpu", "v5", edit(vision_rope={"rope_theta": 20000.0}),
                    r"vision_config\.rope_parameters must be \{'rope_type': 'axial', 'rope_theta': 10000\.0\}"),
    "vision_type": ("toy-cpu", "v5", edit(vision_config={"model_type": "siglip_vision_model"}),
                    r"vision_config\.model_type is 'siglip_vision_model'; expected one of \('qwen3_vl', "
                    r"'qwen3_vl_vision'\)"),
    "experts": ("qwen3-vl-30b-a3b", "v5", edit(text_config={"num_experts": 64}),
                r"text_config\.num_experts \(64\) and num_local_experts \(128\) disagree"),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_config_json_is_named(case, tmp_path):
    preset, format, change, error = BAD_CONFIGS[case]
    (tmp_path / "config.json").write_text(json.dumps(change(Qwen3VLConfig.from_preset(preset).to_hf_dict(format))))
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "config.json")) + ": " + error):
        read_hf_config(tmp_path)


@pytest.mark.parametrize("format", ["v5", "v4"])
def test_which_flag_ties_the_head(format):
    """4.57 ties the head by text_config.tie_word_embeddings, 5.x by the top-level flag (5.x writes True into
    text_config of an untied MoE model, and does not read it)."""
    d = Qwen3VLConfig.from_preset("qwen3-vl-30b-a3b").to_hf_dict(format)
    for top, text in ((True, False), (False, True)):
        d["tie_word_embeddings"], d["text_config"]["tie_word_embeddings"] = top, text
        assert Qwen3VLConfig.from_hf_dict(d).tie_word_embeddings == (top if format == "v5" else text)
    del d["text_config"]["tie_word_embeddings"], d["tie_word_embeddings"]
    assert Qwen3VLConfig.from_hf_dict(d).tie_word_embeddings is False         # both generations' default


def test_config_errors_outside_files():
    with pytest.raises(ValueError, match="unknown config.json format 'v6'"):
        Qwen3VLConfig.from_preset("toy-cpu").to_hf_dict("v6")
    with pytest.raises(ValueError, match="unknown preset"):
        Qwen3VLConfig.from_preset("qwen3-vl-7b")
    with pytest.raises(TypeError):
        Qwen3VLConfig.from_preset("toy-cpu", layers=3)


def test_placeholder_count_mismatch(pair):
    kw, error = short_of_image_features()
    with pytest.raises(ValueError, match=error):
        pair[1](**kw)


def test_prompt_longer_than_context(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="longer than the context"):
        ours(torch.zeros(1, 4097, dtype=torch.long))
