"""sample.py against the reference's generate (transformers 5, tiny random model, fp32, CPU): greedy tokens on
text, an image, a timestamped video and a padded mixed batch; seeded sampling; log-probs against a fresh forward
pass; penalties and truncation as defined; per-row stopping; a decode step that compiles as one static graph; the
command line; errors."""
import copy
import importlib.util
import json
import os

import pytest
import torch
from conftest import make_batch, reference_inputs, short_of_image_features

from model import KVCache
from sample import INSTRUCT, PAD_ID, apply_penalties, decode_step, generate, main, warp

CASES = {
    "text": [[("text", 24)]],
    "image": [[("text", 5), ("image", (1, 4, 6)), ("text", 7)]],
    "video": [[("text", 3), ("video", (3, 4, 4)), ("text", 5)]],
    "padded_mixed_batch": [[("text", 3), ("image", (1, 4, 6)), ("video", (2, 4, 4)), ("text", 5)],
                           [("text", 4), ("image", (1, 2, 2)), ("text", 2)],
                           [("text", 9)]],
}


@pytest.mark.parametrize("case", CASES)
def test_greedy_matches_reference(pair, case):
    ref, ours = pair
    kw = make_batch(CASES[case])
    S = kw["input_ids"].shape[1]
    with torch.no_grad():     # eos_token_id=None: all 32 tokens, as eos_ids=() does for ours
        expected = ref.generate(**reference_inputs(kw), max_new_tokens=32, do_sample=False, eos_token_id=None,
                                pad_token_id=PAD_ID)[:, S:]
    got = generate(ours, **kw, max_new_tokens=32, temperature=0.0, eos_ids=())
    assert torch.equal(got, expected)


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def test_seeded_sampling_is_reproducible(pair):
    _, ours = pair
    kw = make_batch(CASES["padded_mixed_batch"])
    a, b, c = (generate(ours, **kw, max_new_tokens=8, **INSTRUCT, generator=seeded(s)) for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_logprobs_equal_a_fresh_forward_pass(pair):
    _, ours = pair
    kw = make_batch(CASES["padded_mixed_batch"])
    S = kw["input_ids"].shape[1]
    tokens, logprobs = generate(ours, **kw, max_new_tokens=10, generator=seeded(0), eos_ids=(),
                                return_logprobs=True, **{**INSTRUCT, "presence_penalty": 3.0})
    full = dict(kw, input_ids=torch.cat([kw["input_ids"], tokens], 1),
                attention_mask=torch.cat([kw["attention_mask"], torch.ones_like(tokens)], 1))
    with torch.no_grad():
        logits, _ = ours(**full)
    expected = logits[:, S - 1:-1].log_softmax(-1).gather(2, tokens[..., None])[..., 0]   # [B, 10]
    torch.testing.assert_close(logprobs, expected, rtol=0, atol=1e-5)


def test_rows_stop_at_their_own_eos(pair):
    _, ours = pair
    kw = make_batch(CASES["padded_mixed_batch"])
    free = generate(ours, **kw, max_new_tokens=16, temperature=0.0, eos_ids=())
    eos = next(int(t) for t in free[0, 3:12] if t not in free[2])     # ends row 0 (and maybe row 1), never row 2
    tokens, logprobs = generate(ours, **kw, max_new_tokens=16, temperature=0.0, eos_ids=(eos,),
                                pad_id=-1, return_logprobs=True)
    for row in range(3):
        hits = (free[row] == eos).nonzero()
        end = int(hits[0]) + 1 if len(hits) else 16                     # the EOS itself is kept
        assert torch.equal(tokens[row, :end], free[row, :end])
        assert (tokens[row, end:] == -1).all() and (logprobs[row, end:] == 0).all()
        assert (logprobs[row, :end] < 0).all()
    assert (tokens[0] == -1).any() and not (tokens[2] == -1).any()
    # every row stopped: the loop ends early and the output is still [B, max_new_tokens]
    alone = generate(ours, **{k: v[2:] if k in ("input_ids", "attention_mask") else None for k, v in kw.items()},
                     max_new_tokens=16, temperature=0.0, eos_ids=(int(free[2, 1]),), pad_id=-1)
    assert alone.shape == (1, 16) and (alone[0, 2:] == -1).all()


# ------------------------------------------------------------------------------------------------ the sampler
def test_repetition_penalty_equals_reference_processor():
    from transformers import RepetitionPenaltyLogitsProcessor
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g) * 3
    ids = torch.randint(0, 50, (4, 12), generator=g)
    prompt, output = ids[:, :8], ids[:, 8:]
    in_prompt = torch.zeros(4, 50, dtype=torch.bool).scatter_(1, prompt, True)
    in_output = torch.zeros(4, 50, dtype=torch.bool).scatter_(1, output, True)
    for r in (1.3, 0.7):
        expected = RepetitionPenaltyLogitsProcessor(r)(ids, logits.clone())
        torch.testing.assert_close(apply_penalties(logits, in_prompt, in_output, repetition_penalty=r), expected,
                                   rtol=0, atol=0)


def test_presence_penalty_subtracts_once_per_generated_id():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 30, generator=g)
    in_prompt = torch.rand(2, 30, generator=g) < 0.3
    in_output = torch.rand(2, 30, generator=g) < 0.3
    got = apply_penalties(logits, in_prompt, in_output, presence_penalty=1.5)
    torch.testing.assert_close(got, logits - 1.5 * in_output.float(), rtol=0, atol=0)   # the prompt is not counted
    # both: the repetition penalty first, then the presence penalty
    got = apply_penalties(logits, in_prompt, in_output, repetition_penalty=2.0, presence_penalty=1.5)
    scaled = torch.where(logits < 0, logits * 2, logits / 2)
    torch.testing.assert_close(got, torch.where(in_prompt | in_output, scaled, logits) - 1.5 * in_output.float())


def test_presence_penalty_stops_repeats(pair):
    _, ours = pair
    kw = make_batch(CASES["text"])
    tokens = generate(ours, **kw, max_new_tokens=24, temperature=0.0, eos_ids=(), presence_penalty=1e4)
    assert len(set(tokens[0].tolist())) == 24


def test_warp_equals_reference_warpers():
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 200, generator=g) * 2
    for temperature, top_k, top_p in [(0.7, 20, 0.8), (1.0, 0, 0.5), (1.3, 5, 1.0), (1.0, 0, 1.0)]:
        expected = TemperatureLogitsWarper(temperature)(None, logits)
        if top_k:
            expected = TopKLogitsWarper(top_k)(None, expected)
        if top_p < 1:
            expected = TopPLogitsWarper(top_p)(None, expected)
        torch.testing.assert_close(warp(logits, temperature, top_k, top_p), expected, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ static decode
def test_decode_step_compiles_to_one_static_graph(pair):
    """No graph break and no recompilation across steps: what torch.compile + a CUDA graph capture need."""
    from torch._dynamo.testing import CompileCounter
    _, ours = pair
    kw = make_batch(CASES["padded_mixed_batch"][1:])
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
    assert int(compiled.pos) == S + 3


def test_fused_projections_keep_values_state_dict_and_gradients(pair):
    """fuse_projections (sample.py --compile): the same parameters, now views of one matrix per layer part; decoding
    reads the fused matrix and gives the reference's greedy tokens; training still reaches every weight."""
    ref, ours = pair
    fused = copy.deepcopy(ours).fuse_projections()
    a = fused.language_model.layers[1]
    assert a.self_attn.k_proj.weight.untyped_storage().data_ptr() == a.self_attn.qkv_weight.untyped_storage().data_ptr()
    assert a.mlp.up_proj.weight.untyped_storage().data_ptr() == a.mlp.gate_up_weight.untyped_storage().data_ptr()
    before, after = ours.state_dict(), fused.state_dict()
    assert list(before) == list(after) and all(torch.equal(before[k], after[k]) for k in before)

    kw = make_batch(CASES["padded_mixed_batch"])
    S = kw["input_ids"].shape[1]
    with torch.no_grad():
        expected = ref.generate(**reference_inputs(kw), max_new_tokens=32, do_sample=False, eos_token_id=None,
                                pad_token_id=PAD_ID)[:, S:]
        torch.testing.assert_close(fused(**kw)[0], ours(**kw)[0], rtol=0, atol=1e-5)
    assert torch.equal(generate(fused, **kw, max_new_tokens=32, temperature=0.0, eos_ids=()), expected)

    labels = kw["input_ids"].masked_fill(kw["attention_mask"] == 0, -100)
    for m in (ours, fused):
        m.zero_grad()
        m(**kw, labels=labels)[1].backward()
    for (name, p), q in zip(ours.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-6, msg=name)
    ours.zero_grad()
    with torch.no_grad():                               # an optimizer step on a part shows in the fused matrix
        a.self_attn.v_proj.weight.sub_(a.self_attn.v_proj.weight.grad)
    assert torch.equal(a.self_attn.qkv_weight[-a.self_attn.v_proj.out_features:], a.self_attn.v_proj.weight)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_decode_equals_eager(pair):
    """The compiled step in a CUDA graph, with and without fused projections, against the eager loop (fp32, GPU)."""
    model = copy.deepcopy(pair[1]).to("cuda")
    kw = {k: v.cuda() for k, v in make_batch(CASES["padded_mixed_batch"]).items()}
    eager, eager_lp = generate(model, **kw, max_new_tokens=16, temperature=0.0, eos_ids=(), return_logprobs=True)
    for m in (model, copy.deepcopy(model).fuse_projections()):
        graph, graph_lp = generate(m, **kw, max_new_tokens=16, temperature=0.0, eos_ids=(), return_logprobs=True,
                                   cuda_graph=True)
        assert torch.equal(eager, graph)
        torch.testing.assert_close(eager_lp, graph_lp, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------------ errors
def test_prompt_longer_than_context(pair):
    _, ours = pair
    ids = torch.zeros(1, 4090, dtype=torch.long)                         # max_position_embeddings = 4096
    with pytest.raises(ValueError, match=r"prompt \(4090 tokens\) plus max_new_tokens \(7\) is longer than the "
                                         r"context \(4096"):
        generate(ours, ids, max_new_tokens=7)
    with pytest.raises(ValueError, match=r"sequence of 10 tokens is longer than the context \(8\)"):
        ours(ids[:, :10], kv_cache=KVCache(ours.cfg.text, 1, 8))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda_graph=True needs the model and inputs on a CUDA device"):
            generate(ours, ids[:, :10], max_new_tokens=2, cuda_graph=True)


def test_image_token_count_must_match_the_image(pair):
    kw, error = short_of_image_features()
    with pytest.raises(ValueError, match=error):
        generate(pair[1], **kw, max_new_tokens=4)


def test_missing_checkpoint_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        main(["--init_from", str(tmp_path / "nope"), "--prompt", "hi"])


# ------------------------------------------------------------------------------------------------ command line
def qwen_tokenizer():
    """The Qwen ranks file (data/qwen.tiktoken, else dashscope's copy); the tiny checkpoint has no tokenizer files."""
    from tokenizer import DEFAULT_PATH, Tokenizer
    path = DEFAULT_PATH
    if not os.path.exists(path):
        spec = importlib.util.find_spec("dashscope")
        if spec is None:
            pytest.skip("no Qwen ranks file: run `python data/get_tokenizer.py`")
        path = os.path.join(spec.submodule_search_locations[0], "resources", "qwen.tiktoken")
    return Tokenizer.from_pretrained(path)


def test_command_line_streams_and_grounds(pair, tmp_path, monkeypatch, capsys):
    from PIL import Image

    import tokenizer
    ref, _ = pair
    ref.save_pretrained(tmp_path / "ckpt")
    tok = qwen_tokenizer()
    monkeypatch.setattr(tokenizer.Tokenizer, "from_pretrained", classmethod(lambda cls, path=None: tok))
    with open(tmp_path / "ckpt" / "preprocessor_config.json", "w") as f:         # the image budget: 64 x 64 pixels
        json.dump({"size": {"shortest_edge": 2048, "longest_edge": 4096}}, f)
    Image.new("RGB", (64, 48), "gray").save(tmp_path / "a.png")
    main(["--init_from", str(tmp_path / "ckpt"), "--image", str(tmp_path / "a.png"), "--prompt", "Where is it?",
          "--max_new_tokens", "6", "--temperature", "0", "--device", "cpu", "--ground"])
    out, err = capsys.readouterr()
    n_prompt = len(tok.apply_chat_template([{"role": "user", "content": "Where is it?"}], add_generation_prompt=True))
    assert f"[{n_prompt + 2 + 4} prompt tokens, 6 new tokens" in err      # + vision start/end + 2x2 merged patches
    assert "drawn onto" in err
    assert len(out.strip()) > 0
    assert Image.open(tmp_path / "a_ground.png").size == (64, 48)
