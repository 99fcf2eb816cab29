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
    """[3, 2, n] (t, h, w) positions up to `high`, h and w up to 39 ahead of t (as in a visual block)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, high, (2, n), generator=g).sort(dim=-1).values        # [2, n]
    h, w = (t + torch.randint(0, 40, (2, n), generator=g) for _ in range(2))
    return torch.stack([t, h, w])                                               # [3, 2, n]


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


@pytest.fixture(scope="module")
def yarn_pair(tmp_path_factory):
    """(reference, ours): a tiny random Qwen3-VL whose config has YaRN x3 over 64 original positions."""
    return build_pair(tmp_path_factory.mktemp("yarn"), max_position_embeddings=4096,
                      rope_scaling={"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 64,
                                    "mrope_section": [4, 2, 2], "mrope_interleaved": True})


def test_scaled_model_logits_match_reference(yarn_pair):
    """A tiny random Qwen3-VL with YaRN in its config: our logits equal the reference's (text, image and video)."""
    import copy
    ref, ours = yarn_pair
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
    unscaled = copy.copy(ours)                           # the same weights without YaRN: other logits
    unscaled.cfg = plain
    with torch.no_grad():
        assert (unscaled(**kw)[0][m] - r[m]).abs().max().item() > 1e-3


def test_scaled_decode_matches_reference(yarn_pair):
    """Greedy decoding through the KV cache (sample.generate: each step's cos/sin from the same scaled frequencies)
    gives the reference's tokens, past the 64 original positions, and its log-probabilities equal a fresh forward."""
    from sample import generate
    ref, ours = yarn_pair
    kw = make_batch([[("text", 50), ("image", (1, 4, 6)), ("text", 9)], [("text", 20)]])
    with torch.no_grad():
        expected = ref.generate(**reference_inputs(kw), max_new_tokens=40, do_sample=False, eos_token_id=None,
                                pad_token_id=151643)[:, kw["input_ids"].shape[1]:]
    tokens, logprobs = generate(ours, **kw, max_new_tokens=40, temperature=0.0, eos_ids=(), return_logprobs=True)
    assert torch.equal(tokens, expected)
    full = dict(kw, input_ids=torch.cat([kw["input_ids"], tokens], 1),
                attention_mask=torch.cat([kw["attention_mask"], torch.ones_like(tokens)], 1))
    with torch.no_grad():
        logits, _ = ours(**full)
    S = kw["input_ids"].shape[1]
    fresh = logits[:, S - 1:-1].log_softmax(-1).gather(-1, tokens[..., None])[..., 0]          # [B, 40]
    torch.testing.assert_close(logprobs, fresh, rtol=0, atol=1e-5)


def test_scaled_decode_step_compiles_to_one_static_graph(yarn_pair):
    """The YaRN frequencies add no graph break or recompilation to the decode step (sample.py --compile)."""
    from torch._dynamo.testing import CompileCounter
    from model import KVCache
    from sample import decode_step
    _, ours = yarn_pair
    kw = make_batch([[("text", 70)], [("text", 66)]])
    B, S = kw["input_ids"].shape
    mask = torch.cat([kw["attention_mask"], torch.ones(B, 4, dtype=torch.long)], 1)          # [B, S + 4]
    eager, compiled = KVCache(ours.cfg.text, B, S + 4), KVCache(ours.cfg.text, B, S + 4)
    counter = CompileCounter()
    step = torch.compile(decode_step, backend=counter, fullgraph=True)
    with torch.no_grad():
        for cache in (eager, compiled):
            ours(**kw, kv_cache=cache)
        tokens = torch.tensor([[5], [6]])
        for _ in range(3):
            a, b = decode_step(ours, eager, tokens, mask), step(ours, compiled, tokens, mask)
            torch.testing.assert_close(a, b, rtol=0, atol=0)
            tokens = a.argmax(-1, keepdim=True)
    assert counter.frame_count == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_scaled_cuda_graph_decode_equals_eager(yarn_pair):
    """The compiled decode step in a CUDA graph with YaRN in the config, against the eager loop (fp32, GPU)."""
    import copy
    from sample import generate
    model = copy.deepcopy(yarn_pair[1]).to("cuda")
    kw = {k: v.cuda() for k, v in make_batch([[("text", 50), ("image", (1, 4, 6)), ("text", 9)],
                                              [("text", 20)]]).items()}
    eager, eager_lp = generate(model, **kw, max_new_tokens=40, temperature=0.0, eos_ids=(), return_logprobs=True)
    graph, graph_lp = generate(model, **kw, max_new_tokens=40, temperature=0.0, eos_ids=(), return_logprobs=True,
                               cuda_graph=True)
    assert torch.equal(eager, graph)
    torch.testing.assert_close(eager_lp, graph_lp, rtol=0, atol=1e-4)


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
    cfg = Qwen3VLConfig.from_preset("qwen3-vl-8b", text=dict(rope_scaling=dict(YARN_1M),
                                                              max_position_embeddings=786432))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict(format)))
    theirs = AutoConfig.from_pretrained(tmp_path)
    assert {k: theirs.text_config.rope_parameters[k] for k in YARN_1M} == YARN_1M
    assert Qwen3VLConfig.from_hf_dict(json.loads(theirs.to_json_string())) == cfg
    assert cfg.text.context_length == 786432


def test_config_json_with_unknown_scaling_is_named(tmp_path):
    """A file's rope_type and keys are checked as TextConfig.rope_scaling, the file named."""
    from config import read_hf_config
    d = Qwen3VLConfig.from_preset("toy-cpu").to_hf_dict("v4")
    d["text_config"]["rope_scaling"].update(rope_type="yarn", factor=2.0, beta=3)
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"config.json: text.rope_scaling: unknown key\(s\) \['beta'\] for rope_type "
                                         r"'yarn'; known: \['attention_factor', 'beta_fast'"):
        read_hf_config(tmp_path)


@pytest.mark.parametrize("scaling, error", [
    ({"rope_type": "longrope", "factor": 2.0},
     r"rope_type 'longrope' is not implemented; supported: default \(rope_scaling None\), linear, yarn"),
    ({"rope_type": "dynamic", "factor": 2.0}, "rope_type 'dynamic' is not implemented .its frequencies follow the "
                                              "longest sequence"),
    ({"rope_type": "yarn"}, "rope_type 'yarn' needs a factor"),
    ({"rope_type": "yarn", "factor": 0.5}, r"text.rope_scaling.factor=0.5: must be a finite number in \[1, "),
    ({"rope_type": "linear", "factor": 2.0, "beta_fast": 3},
     r"unknown key\(s\) \['beta_fast'\] for rope_type 'linear'"),
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


# ----------------------------------------------------------------------------------------------------------
# train.py: the stages' rows, the row-length check, the planner


def test_stage_rows_paper_and_toy():
    """At the paper's --seq_len 8192 the stages have the paper's rows (8K, 32K, 256K); the toy recipe keeps its own."""
    import train
    from data.toy import ToyData
    paper, toy = train.parse_args(["--data", "x.jsonl"]), train.parse_args([])
    rows = {name: train.stage_seq_len(name, ToyData(), paper) for name in train.STAGES}
    assert rows == {"align": 8192, "pretrain": 8192, "long": 32768, "ultralong": 262144, "sft": 8192}
    assert {name: train.stage_seq_len(name, ToyData(), toy) for name, _ in toy.stage_list} == \
        {"align": 192, "shapes": 192, "pretrain": 192, "video": 192, "long": 384, "binding": 192, "sft": 192}


def test_row_longer_than_context_is_refused(tmp_path):
    """toy-cpu has 4096 positions: the long stage's 4 x 2048 rows are refused before a step, with the numbers;
    YaRN x2 in the config makes them fit."""
    import train
    from data.toy import ToyData
    args = train.parse_args(["--data", "x.jsonl", "--seq_len", "2048", "--stages", "pretrain:1,long:1"])
    cfg = Qwen3VLConfig.from_preset("toy-cpu")
    with pytest.raises(ValueError, match=r"--stages long: rows of 8192 tokens \(--seq_len 2048 x 4\) are longer than "
                                         r"the model's context of 4096 tokens; lower --seq_len \(or --long_seq_mult\)"):
        train.check_rows(args, ToyData(), cfg)
    train.check_rows(args, ToyData(), Qwen3VLConfig.from_preset("toy-cpu", text=dict(
        rope_scaling={"rope_type": "yarn", "factor": 2.0})))
    with pytest.raises(ValueError, match="rows of 8192 tokens"):                 # through main, before any file
        train.main(["--seq_len", "4096", "--stages", "pretrain:1", "--long_seq_mult", "2", "--stages", "long:1",
                    "--vocab_size", "300", "--out_dir", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_plan_is_linear_in_the_row_and_split_by_cp():
    """Activations grow linearly with the row (no [S, S] term on the flex path, no [S, V] logits), monotone in it;
    context parallelism over N divides them by N (up to one layer's gathered K/V and the loss chunk); the state
    does not depend on the row."""
    import train
    cfg = Qwen3VLConfig.from_preset("qwen3-vl-8b")
    counts = train.param_counts(cfg)
    for ac in (False, True):
        a = {S: train.plan(cfg, S, 1, 8, ac, counts=counts)["activations"] for S in (8192, 16384, 32768, 262144)}
        assert a[8192] < a[16384] < a[32768] < a[262144]
        assert a[32768] - a[16384] == pytest.approx(2 * (a[16384] - a[8192]), rel=1e-9)     # affine in S
        assert a[262144] == pytest.approx(a[8192] + 31 * (a[16384] - a[8192]), rel=1e-9)
        one = train.plan(cfg, 262144, 1, 8, ac, counts=counts)
        for n in (2, 8):
            split = train.plan(cfg, 262144, 1, 8, ac, cp=n, counts=counts)
            assert split["state"] == one["state"]
            kv = 2 * 2 * cfg.text.num_key_value_heads * cfg.text.head_dim * 262144
            chunk = 1024 * cfg.text.vocab_size * 10
            assert split["activations"] - kv - chunk == pytest.approx((one["activations"] - chunk) / n, rel=1e-9)
        # no [S, V] term: the cost of a token does not depend on the vocabulary
        big_vocab = Qwen3VLConfig.from_preset("qwen3-vl-8b", text=dict(vocab_size=4 * 151936))
        b = {S: train.plan(big_vocab, S, 1, 8, ac, counts=counts)["activations"] for S in (8192, 16384)}
        assert b[16384] - b[8192] == a[16384] - a[8192]


def test_gpus_for_a_256k_row():
    """More GPUs for a longer row and a bigger model; the count found fits and half of it does not."""
    import train
    small, big = Qwen3VLConfig.from_preset("qwen3-vl-2b"), Qwen3VLConfig.from_preset("qwen3-vl-32b")
    n = train.gpus_for_row(big, 262144)
    assert train.gpus_for_row(small, 262144) <= n and train.gpus_for_row(big, 32768) <= n and n > 1
    fits = lambda k: train.plan(big, 262144, 1, k, True, cp=k)["total"] <= train.GPU_MEMORY
    assert fits(n) and not fits(n // 2)


# ----------------------------------------------------------------------------------------------------------
# A long packed row: its loss is its documents' losses


@pytest.mark.parametrize("weighting", ["token", "sqrt"])
def test_long_packed_row_loss_is_its_documents_losses(weighting):
    """A row of ~3,000 tokens packing five documents (one with an image), on the dense path: its summed loss is the
    sum of each document's own summed loss, computed alone (token weighting: the mean is the token-weighted mean
    of the documents' means; sqrt: each document's mean weighs sqrt(its targets))."""
    import train
    from conftest import randomize_
    from model import Qwen3VL
    from rope import rope_index
    cfg = Qwen3VLConfig.from_preset("toy-cpu", text=dict(vocab_size=512), image_token_id=508, video_token_id=509,
                                    vision_start_token_id=510, vision_end_token_id=511)
    model = randomize_(Qwen3VL(cfg), seed=3).eval()
    g = torch.Generator().manual_seed(0)
    docs = []
    for i, n in enumerate([900, 40, 1200, 7, 800]):
        ids = torch.randint(0, 500 if i % 2 else 100, (n,), generator=g)          # two vocabularies: other losses
        grid, pv = None, None
        if i == 2:                                                              # an image of 8 x 8 patches: 16 tokens
            ids = torch.cat([ids[:30], torch.tensor([510] + [508] * 16 + [511]), ids[30:]])
            grid, pv = torch.tensor([[1, 8, 8]]), torch.randn(64, 1536, generator=g)
        pos, _ = rope_index(ids[None], None, grid, None, image_token_id=508, video_token_id=509)
        labels = ids.masked_fill(ids == 508, -100)
        labels[0] = -100
        docs.append(dict(ids=ids, labels=labels, pos=pos[:, 0], pv=pv, ig=grid, pvv=None, vg=None))
    S = sum(len(d["ids"]) for d in docs) + 5
    batch = train.collate([docs], S, 0, weighting)
    labels, weights = batch.pop("labels"), batch.pop("weights", None)
    batch.pop("real")
    with torch.no_grad():
        _, packed = model(**batch, labels=labels, loss_weights=weights, loss_reduction="sum", return_hidden=True)
        alone, counts = [], []
        for d in docs:
            _, loss = model(d["ids"][None], pixel_values=d["pv"], image_grid_thw=d["ig"], labels=d["labels"][None],
                            loss_reduction="mean", return_hidden=True)
            alone.append(loss)
            counts.append(int((d["labels"][1:] != -100).sum()))
    counts = torch.tensor(counts, dtype=torch.float32)
    means = torch.stack(alone)
    per_doc = counts if weighting == "token" else counts.sqrt()                 # each document's mean's weight
    torch.testing.assert_close(packed, (per_doc * means).sum(), rtol=1e-5, atol=0)
    torch.testing.assert_close(packed / train.target_weight(dict(labels=labels, **({"weights": weights} if weights
                               is not None else {}))), (per_doc * means).sum() / per_doc.sum(), rtol=1e-5, atol=0)
    assert (means.max() - means.min()).item() > 0.1                             # the documents' losses differ
