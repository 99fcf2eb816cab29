"""model.py against the reference Qwen3VLForConditionalGeneration (tiny, random, fp32, CPU): whole-model logits and
loss on text, images, video and padded mixed batches; checkpoints both ways; presets; errors."""
import json

import pytest
import torch
from conftest import build_pair, make_batch, short_of_image_features

from model import Qwen3VL, Qwen3VLConfig

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
        r = ref(**kw, labels=labels)
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


def test_save_pretrained_loads_in_reference(pair, tmp_path):
    """ours.from_pretrained(ref dir) -> ours.save_pretrained -> reference.from_pretrained: identical logits."""
    from transformers import Qwen3VLForConditionalGeneration
    ref, ours = pair
    ours.save_pretrained(tmp_path / "ours")
    ref2 = Qwen3VLForConditionalGeneration.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    kw = make_batch(CASES["padded_mixed_batch"])
    with torch.no_grad():
        a, b = ref(**kw).logits, ref2(**kw).logits
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


def test_unknown_config_keys():
    d = Qwen3VLConfig.from_preset("toy-cpu").to_hf_dict()
    d["text_config"]["hiden_size"] = 3
    with pytest.raises(ValueError, match=r"unknown text_config key\(s\) \['hiden_size'\]"):
        Qwen3VLConfig.from_hf_dict(d)
    with pytest.raises(ValueError, match="model_type='llama'"):
        Qwen3VLConfig.from_hf_dict({"model_type": "llama"})
    with pytest.raises(ValueError, match="unknown preset"):
        Qwen3VLConfig.from_preset("qwen3-vl-7b")
    with pytest.raises(TypeError):
        Qwen3VLConfig.from_preset("toy-cpu", layers=3)


def test_hf_config_round_trip():
    for name in ("qwen3-vl-2b", "qwen3-vl-8b", "toy-cpu"):
        cfg = Qwen3VLConfig.from_preset(name)
        assert Qwen3VLConfig.from_hf_dict(json.loads(json.dumps(cfg.to_hf_dict()))) == cfg


def test_placeholder_count_mismatch(pair):
    kw, error = short_of_image_features()
    with pytest.raises(ValueError, match=error):
        pair[1](**kw)


def test_prompt_longer_than_context(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="longer than the context"):
        ours(torch.zeros(1, 4097, dtype=torch.long))
