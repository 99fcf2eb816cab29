"""Long context: RoPE scaling (YaRN, linear) on the interleaved MRoPE against the reference's rotary embedding and
whole model; the config keys of both file formats; the row-length check, the stage rows and the memory planner of
train.py; a long packed row's loss against its documents' own losses."""
import json

import pytest
import torch
from conftest import build_pair, make_batch, reference_inputs

from config import Qwen3VLConfig, TextConfig
from rope import mrope_cos_sin, rope_frequencies

YARN_1M = {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 262144}   # the released 1M recipe
SCALINGS = {
    "yarn2": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 262144},
    "yarn3": YARN_1M,
    "yarn_no_truncate": {**YARN_1M, "truncate": False, "beta_fast": 16, "beta_slow": 2},
    "yarn_mscale": {**YARN_1M, "mscale": 1.0, "mscale_all_dim": 0.5},
    "yarn_attention_factor": {**YARN_1M, "attention_factor": 1.25},
    "yarn_default_original": {"rope_type": "yarn", "factor": 2.0},          # original = max_position_embeddings
    "linear": {"rope_type": "linear", "factor": 4.0},
}
SIZES = {"tiny": (16, [4, 2, 2]), "real": (128, [24, 20, 20])}


def reference_rotary(head_dim, section, scaling, max_position_embeddings=262144, theta=5_000_000.0):
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding
    cfg = Qwen3VLTextConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                            max_position_embeddings=max_position_embeddings,
                            rope_parameters={"rope_theta": theta, "mrope_section": section, "mrope_interleaved": True,
                                             **scaling})
    return Qwen3VLTextRotaryEmbedding(cfg)


def long_positions(n=512, high=300_000, seed=0):
    """[3, 2, n] (t, h, w) positions up to `high`: text runs (t = h = w) and visual blocks (h, w ahead of t)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, high, (2, n), generator=g).sort(dim=-1).values
    return torch.stack([t, t + torch.randint(0, 40, (2, n), generator=g), t + torch.randint(0, 40, (2, n), generator=g)])


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("scaling", SCALINGS)
def test_scaled_mrope_matches_reference(size, scaling):
    head_dim, section = SIZES[size]
    pos = long_positions()
    ref_cos, ref_sin = reference_rotary(head_dim, section, SCALINGS[scaling])(torch.zeros(1, dtype=torch.float32), pos)
    cos, sin = mrope_cos_sin(pos, rope_frequencies(head_dim, 5_000_000.0, SCALINGS[scaling], 262144), section)
    torch.testing.assert_close(cos, ref_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, ref_sin, rtol=0, atol=1e-6)


def test_yarn_changes_only_the_slow_frequencies():
    """Past the ramp the fastest frequencies stay as they are, the slowest are divided by the factor, in between they
    fall monotonically; cos and sin carry 0.1 ln(3) + 1."""
    plain, one = rope_frequencies(128, 5e6)
    yarn, scale = rope_frequencies(128, 5e6, YARN_1M)
    ratio = yarn / plain                                                            # [64]
    assert one == 1.0 and scale == pytest.approx(0.1 * torch.tensor(3.0).log().item() + 1)
    assert torch.equal(yarn[:4], plain[:4]) and torch.allclose(ratio[-4:], torch.tensor(1 / 3))
    assert (ratio[1:] <= ratio[:-1] + 1e-7).all() and ((ratio > 0.34) & (ratio < 0.99)).any()


def test_scaled_model_logits_match_reference(tmp_path):
    """A tiny random Qwen3-VL with YaRN in its config: our logits equal the reference's (text, image and video)."""
    ref, ours = build_pair(tmp_path, max_position_embeddings=4096,
                           rope_scaling={"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 64,
                                         "mrope_section": [4, 2, 2], "mrope_interleaved": True})
    assert ours.cfg.text.rope_scaling == {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 64}
    kw = make_batch([[("text", 70), ("image", (1, 4, 6)), ("text", 30), ("video", (2, 4, 4)), ("text", 9)],
                     [("text", 40), ("image", (1, 8, 4)), ("text", 3)]])
    with torch.no_grad():
        r = ref(**reference_inputs(kw)).logits
        logits, _ = ours(**kw)
    m = kw["attention_mask"].bool()
    assert (logits[m] - r[m]).abs().max().item() <= 1e-5
    plain = Qwen3VLConfig.from_hf_dict({**ours.cfg.to_hf_dict(), "text_config": {
        **ours.cfg.to_hf_dict()["text_config"], "rope_parameters": {"rope_type": "default", "rope_theta": 5e6,
                                                                     "mrope_section": [4, 2, 2]}}})
    ours.cfg = plain                                     # the same weights without YaRN: other logits
    with torch.no_grad():
        assert (ours(**kw)[0][m] - r[m]).abs().max().item() > 1e-3


@pytest.mark.parametrize("format", ["v5", "v4"])
@pytest.mark.parametrize("scaling", SCALINGS)
def test_config_round_trip_with_scaling(format, scaling):
    """Written in either format and read back: the same config; the file holds exactly the keys given."""
    cfg = Qwen3VLConfig.from_preset("qwen3-vl-8b", text=dict(rope_scaling=dict(SCALINGS[scaling])))
    d = json.loads(json.dumps(cfg.to_hf_dict(format)))
    rope = d["text_config"]["rope_parameters" if format == "v5" else "rope_scaling"]
    assert {k: v for k, v in rope.items() if k not in ("mrope_section", "mrope_interleaved", "rope_theta")} \
        == SCALINGS[scaling]
    assert Qwen3VLConfig.from_hf_dict(d) == cfg


@pytest.mark.parametrize("format", ["v5", "v4"])
def test_reference_reads_our_scaled_config(format, tmp_path):
    """The reference's config class reads our file with the same RoPE parameters, and writes back what we read."""
    from transformers import AutoConfig
    cfg = Qwen3VLConfig.from_preset("qwen3-vl-8b", text=dict(rope_scaling=dict(YARN_1M), max_position_embeddings=786432))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict(format)))
    theirs = AutoConfig.from_pretrained(tmp_path)
    assert {k: theirs.text_config.rope_parameters[k] for k in YARN_1M} == YARN_1M
    assert Qwen3VLConfig.from_hf_dict(json.loads(theirs.to_json_string())) == cfg
    assert cfg.text.context_length == 786432


@pytest.mark.parametrize("scaling, error", [
    ({"rope_type": "longrope", "factor": 2.0},
     r"rope_type 'longrope' is not implemented; supported: default \(rope_scaling None\), linear, yarn"),
    ({"rope_type": "dynamic", "factor": 2.0}, "rope_type 'dynamic' is not implemented"),
    ({"rope_type": "yarn"}, "rope_type 'yarn' needs a factor"),
    ({"rope_type": "yarn", "factor": 0.5}, r"text.rope_scaling.factor=0.5: must be a finite number in \[1, "),
    ({"rope_type": "linear", "factor": 2.0, "beta_fast": 3}, r"unknown key\(s\) \['beta_fast'\] for rope_type 'linear'"),
    ({"rope_type": "yarn", "factor": 2.0, "beta_fast": 1, "beta_slow": 8}, "beta_fast=1 must be >= beta_slow=8"),
    ({"rope_type": "yarn", "factor": 2.0, "truncate": 1}, "text.rope_scaling.truncate=1: must be True or False"),
])
def test_bad_rope_scaling_is_named(scaling, error):
    with pytest.raises((ValueError, TypeError), match=error):
        TextConfig(rope_scaling=scaling)


def test_context_length():
    assert TextConfig().context_length == 262144
    assert TextConfig(rope_scaling=dict(YARN_1M)).context_length == 786432
    assert TextConfig(max_position_embeddings=1_000_000, rope_scaling=dict(YARN_1M)).context_length == 1_000_000
    assert TextConfig(max_position_embeddings=4096, rope_scaling={"rope_type": "linear", "factor": 2.0}) \
        .context_length == 8192
