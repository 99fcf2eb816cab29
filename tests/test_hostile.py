"""
Hostile and careless inputs at every boundary: checkpoint files, config.json, preprocessor_config.json, the model's
forward, generate, the chat template, the processor and the command line. Each case checks the exact error type and
message, and that nothing was read, run, written or lost on the way.
"""
import hashlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import safetensors
import torch
from conftest import IMG, make_batch
from safetensors.torch import load_file, save_file

import sample
from config import Qwen3VLConfig, checkpoint_files, read_hf_config
from model import KVCache, Qwen3VL
from processor import Processor
from sample import generate, load_processor, main
from tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_ROW = [[("text", 5), ("image", (1, 4, 6)), ("text", 7)]]         # 20 ids: 6 placeholders, 24 pixel rows


def raises(error, message, fn, *args, **kwargs):
    """fn(*args, **kwargs) raises exactly `error` with exactly `message`."""
    with pytest.raises(error) as info:
        fn(*args, **kwargs)
    assert type(info.value) is error and str(info.value) == message


def digest(folder):
    """Every file under `folder` with the hash of its bytes: equal before and after means nothing was written."""
    paths = [os.path.join(d, f) for d, _, files in os.walk(folder) for f in files]
    return {os.path.relpath(p, folder): hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths}


@pytest.fixture(scope="module")
def ours(pair):
    return pair[1]


@pytest.fixture(scope="module")
def small_tok():
    return Tokenizer.train(["a tiny corpus of words, to train a byte-level BPE quickly"] * 4, 300)


@pytest.fixture
def ckpt(ours, tmp_path):
    """A saved copy of the tiny model in 2 shards and an index."""
    ours.save_pretrained(tmp_path / "ckpt", max_shard_bytes=60_000_000)       # the two embedding tables apart
    assert len(checkpoint_files(tmp_path / "ckpt")) == 2
    return tmp_path / "ckpt"


def edit_json(path, change):
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))


# ------------------------------------------------------------------------------------------------ checkpoint files
@pytest.mark.parametrize("shard", ["../elsewhere/x.safetensors", "/tmp/x.safetensors", "sub/x.safetensors",
                                   "pytorch_model.bin", 7])
def test_index_cannot_name_a_shard_outside_the_directory(ckpt, tmp_path, monkeypatch, shard):
    (tmp_path / "elsewhere").mkdir()
    save_file({"model.language_model.norm.weight": torch.ones(64)}, tmp_path / "elsewhere" / "x.safetensors")
    index = ckpt / "model.safetensors.index.json"
    edit_json(index, lambda d: d["weight_map"].update({"model.language_model.norm.weight": shard}))
    opened = []
    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: opened.append(a))
    raises(ValueError, f"{str(index)!r}: shard {shard!r}: must be a plain *.safetensors file name inside the "
                       "checkpoint directory", Qwen3VL.from_pretrained, ckpt)
    assert opened == []                                                  # refused before any file was opened


def test_malformed_index_and_config(ckpt):
    index, config = ckpt / "model.safetensors.index.json", ckpt / "config.json"
    good_index = index.read_text()
    index.write_text("{not json")
    raises(ValueError, f"{str(index)!r} is not valid JSON (Expecting property name enclosed in double quotes: "
                       "line 1 column 2 (char 1))", Qwen3VL.from_pretrained, ckpt)
    index.write_text(json.dumps({"metadata": {}}))
    raises(ValueError, f"{str(index)!r}: weight_map must be a non-empty JSON object {{tensor name: shard file}}",
           Qwen3VL.from_pretrained, ckpt)
    index.write_text(good_index)
    config.write_text("[1, 2]")
    raises(ValueError, f"{str(config)!r} must hold a JSON object, got list", Qwen3VL.from_pretrained, ckpt)


def test_tensor_stored_twice(ckpt):
    files = checkpoint_files(ckpt)
    first = load_file(files[0])
    key = next(iter(first))
    second = load_file(files[1])
    save_file({**second, key: first[key]}, files[1])
    raises(ValueError, f"checkpoint tensor {key!r} is stored twice (again in {files[1]!r})",
           Qwen3VL.from_pretrained, ckpt)


def test_integer_tensor_is_refused(ckpt):
    file = checkpoint_files(ckpt)[0]
    tensors = load_file(file)
    key = next(iter(tensors))
    tensors[key] = tensors[key].to(torch.int64)
    save_file(tensors, file)
    raises(ValueError, f"checkpoint tensor {key!r} has dtype I64: only float tensors (F16, BF16, F32, F64) are "
                       "loaded", Qwen3VL.from_pretrained, ckpt)


def test_tensor_of_another_float_dtype_is_cast_to_the_others(ckpt, ours):
    file = checkpoint_files(ckpt)[0]
    tensors = load_file(file)
    key = next(k for k in tensors if k.endswith("norm.weight"))
    tensors[key] = tensors[key].half()
    save_file(tensors, file)
    model = Qwen3VL.from_pretrained(ckpt)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    kw = make_batch(IMAGE_ROW)
    with torch.no_grad():
        torch.testing.assert_close(model(**kw)[0], ours(**kw)[0], rtol=0, atol=1e-2)   # one norm in fp16 steps


# ------------------------------------------------------------------------------------------------ config.json
CONFIG_CASES = [   # (where, key, value, error, message after '<dir>/config.json: ')
    ("text_config", "num_hidden_layers", 10**9, ValueError,
     "text.num_hidden_layers=1000000000: must be an integer in [1, 1024]"),
    ("text_config", "hidden_size", -64, ValueError, "text.hidden_size=-64: must be an integer in [1, 65536]"),
    ("text_config", "vocab_size", 0, ValueError, "text.vocab_size=0: must be an integer in [1, 4194304]"),
    ("text_config", "hidden_size", "64", TypeError, "text.hidden_size='64': must be an integer in [1, 65536]"),
    ("text_config", "head_dim", 16.0, TypeError, "text.head_dim=16.0: must be an integer in [1, 1024]"),
    ("text_config", "num_key_value_heads", 3, ValueError,
     "text.num_key_value_heads=3: must divide text.num_attention_heads=4 (each kv head serves a group)"),
    ("text_config", "rms_norm_eps", 0, ValueError, "text.rms_norm_eps=0: must be a finite number in (0, 1]"),
    ("text_config", "rope_parameters", {"rope_type": "default", "rope_theta": -1, "mrope_section": [4, 2, 2]},
     ValueError, "text.rope_theta=-1: must be a finite number > 0"),
    ("text_config", "max_position_embeddings", 2**40, ValueError,
     "text.max_position_embeddings=1099511627776: must be an integer in [1, 16777216]"),
    ("vision_config", "num_heads", 3, ValueError,
     "vision.num_heads=3: must divide vision.hidden_size=32 into heads whose size is a multiple of 4"),
    ("vision_config", "num_position_embeddings", 2300, ValueError,
     "vision.num_position_embeddings=2300: must be a square (the learned table is a G x G grid)"),
    ("vision_config", "deepstack_visual_indexes", [0, 5], ValueError,
     "vision.deepstack_visual_indexes=[0, 5]: must be a list of distinct layer indexes in [0, vision.depth=3)"),
    ("vision_config", "spatial_merge_size", 0, ValueError,
     "vision.spatial_merge_size=0: must be an integer in [1, 64]"),
    ("vision_config", "out_hidden_size", 32, ValueError,
     "vision.out_hidden_size=32: must equal text.hidden_size=64 (visual tokens enter the LLM)"),
    (None, "image_token_id", 151936, ValueError, "image_token_id=151936: must be an integer in [0, 151935]"),
    (None, "video_token_id", -1, ValueError, "video_token_id=-1: must be an integer in [0, 151935]"),
    (None, "video_token_id", 151655, ValueError, "image_token_id=151655, video_token_id=151655, "
     "vision_start_token_id=151652, vision_end_token_id=151653: must be four different ids"),
    (None, "tie_word_embeddings", "yes", TypeError, "tie_word_embeddings='yes': must be True or False"),
    ("text_config", "rope_parameters", {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [4, 2, 3]},
     ValueError, "text.mrope_section=[4, 2, 3]: must be 3 integers >= 0 (t, h, w) summing to text.head_dim / 2 = 8"),
    ("text_config", "rope_parameters", [1], TypeError, "text_config.rope_parameters=[1]: must be a JSON object"),
    (None, "text_config", "dense", TypeError, "text_config='dense': must be a JSON object"),
]


@pytest.mark.parametrize("where, key, value, error, message", CONFIG_CASES)
def test_config_that_cannot_work_is_refused_on_read(ckpt, where, key, value, error, message):
    before = digest(ckpt)
    edit_json(ckpt / "config.json", lambda d: (d[where] if where else d).__setitem__(key, value))
    raises(error, f"{ckpt / 'config.json'}: {message}", read_hf_config, ckpt)
    raises(error, f"{ckpt / 'config.json'}: {message}", Qwen3VL.from_pretrained, ckpt)
    assert {k: v for k, v in digest(ckpt).items() if k != "config.json"} == \
           {k: v for k, v in before.items() if k != "config.json"}


def test_config_is_checked_on_construction_and_when_a_model_is_built():
    raises(ValueError, "text.num_key_value_heads=4: must divide text.num_attention_heads=6 (each kv head serves a "
                       "group)", Qwen3VLConfig.from_preset, "toy-cpu", text=dict(num_key_value_heads=4))
    raises(ValueError, "text.num_experts_per_tok=9: must be an integer in [1, 8]",
           Qwen3VLConfig.from_preset, "toy-cpu", text=dict(num_experts=8, num_experts_per_tok=9))
    raises(ValueError, "text.mlp_only_layers=[4]: must be a list of distinct layer indexes in "
                       "[0, text.num_hidden_layers=4)", Qwen3VLConfig.from_preset, "toy-cpu",
           text=dict(mlp_only_layers=[4]))
    raises(ValueError, "image_token_id=2034: must be an integer in [0, 319]",
           Qwen3VLConfig.from_preset, "toy-cpu", text=dict(vocab_size=320), image_token_id=2034)
    cfg = Qwen3VLConfig.from_preset("toy-cpu")
    cfg.text.num_attention_heads = 5                          # changed after construction: the model checks again
    raises(ValueError, "text.num_key_value_heads=2: must divide text.num_attention_heads=5 (each kv head serves a "
                       "group)", Qwen3VL, cfg)


# ------------------------------------------------------------------------------------------------ preprocessor budgets
@pytest.mark.parametrize("pre, error, message", [
    ({"size": {"shortest_edge": 10**10, "longest_edge": 10**10}}, ValueError,
     "min_pixels=10000000000: must be an integer in [1, 67108864]"),
    ({"max_pixels": 10**10}, ValueError, "max_pixels=10000000000: must be an integer in [1, 67108864]"),
    ({"min_pixels": 4096, "max_pixels": 1024}, ValueError, "min_pixels=4096, max_pixels=1024: need min_pixels <= "
                                                           "max_pixels"),
    ({"min_pixels": "65536"}, TypeError, "min_pixels='65536': must be an integer in [1, 67108864]"),
    ({"size": [1, 2]}, TypeError, "size=[1, 2]: must be a JSON object"),
])
def test_preprocessor_budgets_are_bounded(tmp_path, small_tok, pre, error, message):
    """A 64x64 image under a budget of 10^10 pixels would be resized to 100000 x 100000."""
    small_tok.save(tmp_path / "tokenizer.tiktoken")
    file = tmp_path / "preprocessor_config.json"
    file.write_text(json.dumps(pre))
    raises(error, f"{str(file)!r}: {message}", load_processor, tmp_path)


def test_corrupt_tokenizer_file_is_named(tmp_path, small_tok):
    small_tok.save(tmp_path / "tokenizer.tiktoken")
    with open(tmp_path / "tokenizer.tiktoken", "ab") as f:
        f.write(b"not-base64! 12\n")
    line = len(small_tok.ranks) + 1                           # the one after the ranks
    raises(ValueError, f"{tmp_path}/tokenizer.tiktoken line {line}: must be 'base64(token bytes) rank', got "
                       "b'not-base64! 12\\n'", load_processor, tmp_path)


# ------------------------------------------------------------------------------------------------ forward inputs
def batch_with(**changes):
    kw = make_batch(IMAGE_ROW)
    for key, change in changes.items():
        kw[key] = change(kw[key]) if callable(change) else change
    return kw


def split_placeholders(ids):
    """Still 6 placeholders, in 3 runs: 2 and 3 in the image block (one became text), 1 stray at the end."""
    ids = ids.clone()
    ids[0, 8], ids[0, -1] = 5, IMG
    return ids


FORWARD_CASES = {   # name: (changes to the batch, error, message)
    "id >= vocab": (dict(input_ids=lambda x: x.index_fill(1, torch.tensor([0]), 151936)), ValueError,
                    "input_ids holds ids from {lo} to 151936: each must be in [0, 151935] (text.vocab_size=151936)"),
    "negative id": (dict(input_ids=lambda x: x.index_fill(1, torch.tensor([0]), -3)), ValueError,
                    "input_ids holds ids from -3 to {hi}: each must be in [0, 151935] (text.vocab_size=151936)"),
    "float ids": (dict(input_ids=lambda x: x.float()), TypeError,
                  "input_ids of dtype torch.float32: must be one of torch.int64, torch.int32"),
    "ids a list": (dict(input_ids=[[1, 2]]), TypeError, "input_ids=list: must be a torch.Tensor"),
    "1-D ids": (dict(input_ids=lambda x: x[0]), ValueError, "input_ids of shape [20]: must be [B, S]"),
    "empty sequence": (dict(input_ids=torch.zeros(1, 0, dtype=torch.long), attention_mask=None, pixel_values=None,
                            image_grid_thw=None), ValueError,
                       "input_ids of shape [1, 0]: must hold at least one row of one token"),
    "grid vs pixel rows": (dict(image_grid_thw=torch.tensor([[1, 4, 4]])), ValueError,
                           "image_grid_thw=[[1, 4, 4]]: sum(t*h*w) = 16 must equal the rows of pixel_values (24)"),
    "grid not mergeable": (dict(image_grid_thw=torch.tensor([[1, 3, 8]])), ValueError,
                           "image_grid_thw=[[1, 3, 8]]: each (t, h, w) must be >= 1 with h and w multiples of "
                           "vision.spatial_merge_size=2"),
    "grid negative": (dict(image_grid_thw=torch.tensor([[-1, 4, 6]])), ValueError,
                      "image_grid_thw=[[-1, 4, 6]]: each (t, h, w) must be >= 1 with h and w multiples of "
                      "vision.spatial_merge_size=2"),
    "grid of 2 columns": (dict(image_grid_thw=torch.tensor([[4, 6]])), ValueError,
                          "image_grid_thw of shape [1, 2]: must be [n, 3] (t, h, w per image or video)"),
    "float grid": (dict(image_grid_thw=torch.tensor([[1.0, 4.0, 6.0]])), TypeError,
                   "image_grid_thw of dtype torch.float32: must be one of torch.int64, torch.int32"),
    "pixels without grid": (dict(image_grid_thw=None), ValueError,
                            "pixel_values without image_grid_thw: give both or neither"),
    "grid without pixels": (dict(pixel_values=None), ValueError,
                            "image_grid_thw without pixel_values: give both or neither"),
    "placeholders without pixels": (dict(pixel_values=None, image_grid_thw=None), ValueError,
                                    "image placeholder tokens (6) in input_ids: need pixel_values and "
                                    "image_grid_thw"),
    "placeholders in three runs": (dict(input_ids=split_placeholders), ValueError,
                                   "image placeholder tokens come in 3 runs: must be one run per image frame group (1 "
                                   "from grids [[1, 4, 6]])"),
    "pixel rows of 1535": (dict(pixel_values=lambda p: p[:, 1:]), ValueError,
                           "pixel_values of shape [24, 1535]: must be [N, 1536] (patch rows)"),
    "integer pixels": (dict(pixel_values=lambda p: p.long()), TypeError,
                       "pixel_values of dtype torch.int64: must be one of torch.float32, torch.bfloat16, "
                       "torch.float16, torch.float64"),
    "NaN pixel": (dict(pixel_values=lambda p: p.index_fill(0, torch.tensor([3]), math.nan)), ValueError,
                  "pixel_values holds NaN or infinite values: must be finite (check_finite=False skips this check)"),
    "infinite pixel": (dict(pixel_values=lambda p: p.index_fill(0, torch.tensor([3]), math.inf)), ValueError,
                       "pixel_values holds NaN or infinite values: must be finite (check_finite=False skips this "
                       "check)"),
    "mask too short": (dict(attention_mask=lambda m: m[:, 1:]), ValueError,
                       "attention_mask of shape [1, 19]: must be [1, 20] (as input_ids)"),
    "mask of another batch": (dict(attention_mask=lambda m: m.repeat(2, 1)), ValueError,
                              "attention_mask of shape [2, 20]: must be [B, S] = [1, 20]"),
    "labels of another shape": (dict(labels=torch.zeros(1, 19, dtype=torch.long)), ValueError,
                                "labels of shape [1, 19]: must be [B, S] = [1, 20] (as input_ids)"),
    "label >= vocab": (dict(labels=torch.full((1, 20), 151936)), ValueError,
                       "labels holds values from 151936 to 151936 (besides -100): each must be -100 (ignored) or in "
                       "[0, 151935]"),
    "label -5": (dict(labels=torch.full((1, 20), -5)), ValueError,
                 "labels holds values from -5 to -5 (besides -100): each must be -100 (ignored) or in [0, 151935]"),
    "loss_weights of another shape": (dict(labels=torch.zeros(1, 20, dtype=torch.long),
                                           loss_weights=torch.ones(1, 19)), ValueError,
                                      "loss_weights of shape [1, 19]: must be [B, S] = [1, 20] (as input_ids)"),
    "position_ids of another shape": (dict(position_ids=torch.zeros(3, 1, 19, dtype=torch.long)), ValueError,
                                      "position_ids of shape [3, 1, 19]: must be [3, 1, 20] (t, h, w) or [1, 20]"),
    "document_ids of another shape": (dict(document_ids=torch.zeros(1, 21, dtype=torch.long)), ValueError,
                                      "document_ids of shape [1, 21]: must be [B, S] = [1, 20] (as input_ids)"),
    "longer than the context": (dict(input_ids=torch.zeros(1, 4097, dtype=torch.long), attention_mask=None,
                                     pixel_values=None, image_grid_thw=None), ValueError,
                                "sequence of 4097 tokens is longer than the context (4096)"),
}


@pytest.mark.parametrize("case", FORWARD_CASES)
def test_forward_refuses_malformed_inputs(ours, case):
    changes, error, message = FORWARD_CASES[case]
    kw = batch_with(**changes)
    if isinstance(kw["input_ids"], torch.Tensor) and kw["input_ids"].numel():
        message = message.format(lo=int(kw["input_ids"].min()), hi=int(kw["input_ids"].max()))
    with torch.no_grad():
        raises(error, message, ours, **kw)


def test_nan_pixels_pass_only_when_asked(ours):
    kw = batch_with(pixel_values=lambda p: p.index_fill(0, torch.tensor([3]), math.nan))
    with torch.no_grad():
        logits, _ = ours(**kw, check_finite=False)
    assert logits[0, -1].isnan().all()               # what the check prevents: the whole row's logits are NaN


def test_cache_of_another_batch_and_no_cache(ours):
    kw = make_batch([[("text", 6)]])
    raises(ValueError, "kv_cache of batch size 2: must be that of input_ids (1)", ours, **kw,
           kv_cache=KVCache(ours.cfg.text, 2, 16))
    raises(TypeError, "kv_cache=dict: must be a KVCache or None", ours, **kw, kv_cache={})
    raises(ValueError, "document_ids (packed training rows) cannot be used with a kv_cache", ours, **kw,
           document_ids=torch.zeros(1, 6, dtype=torch.long), kv_cache=KVCache(ours.cfg.text, 1, 16))


# ------------------------------------------------------------------------------------------------ generate
GENERATE_CASES = [   # (argument, value, error, message)
    ("max_new_tokens", -1, ValueError, "max_new_tokens=-1: must be an integer >= 1"),
    ("max_new_tokens", 0, ValueError, "max_new_tokens=0: must be an integer >= 1"),
    ("max_new_tokens", 2.5, TypeError, "max_new_tokens=2.5: must be an integer >= 1"),
    ("temperature", -0.5, ValueError, "temperature=-0.5: must be a finite number >= 0"),
    ("temperature", math.nan, ValueError, "temperature=nan: must be a finite number >= 0"),
    ("temperature", "hot", TypeError, "temperature='hot': must be a finite number >= 0"),
    ("top_p", 0, ValueError, "top_p=0: must be a finite number in (0, 1]"),
    ("top_p", 1.5, ValueError, "top_p=1.5: must be a finite number in (0, 1]"),
    ("top_k", -1, ValueError, "top_k=-1: must be an integer >= 0"),
    ("top_k", True, TypeError, "top_k=True: must be an integer >= 0"),
    ("repetition_penalty", 0, ValueError, "repetition_penalty=0: must be a finite number in [0.001, 1000.0]"),
    ("presence_penalty", math.inf, ValueError, "presence_penalty=inf: must be a finite number in [-1000000.0, "
                                               "1000000.0]"),
    ("eos_ids", 151645, TypeError, "eos_ids=151645: must be a list of token ids"),
    ("eos_ids", [151645, 10**9], ValueError, "eos_ids[1]=1000000000: must be an integer in [0, 151935]"),
    ("pad_id", "pad", TypeError, "pad_id='pad': must be an integer in [-9223372036854775808, 9223372036854775807]"),
    ("pad_id", 2**63, ValueError, "pad_id=9223372036854775808: must be an integer in [-9223372036854775808, "
                                  "9223372036854775807]"),
    ("generator", 0, TypeError, "generator=0: must be a torch.Generator or None"),
    ("on_token", "print", TypeError, "on_token='print': must be callable or None"),
    ("attention_mask", torch.ones(1, 3, dtype=torch.long), ValueError,
     "attention_mask of shape [1, 3]: must be [1, 20] (as input_ids)"),
    ("input_ids", torch.full((1, 20), 200_000), ValueError,
     "input_ids holds ids from 200000 to 200000: each must be in [0, 151935] (text.vocab_size=151936)"),
    ("pixel_values", torch.full((24, 1536), math.nan), ValueError,
     "pixel_values holds NaN or infinite values: must be finite (check_finite=False skips this check)"),
    ("max_new_tokens", 4077, ValueError, "the prompt (20 tokens) plus max_new_tokens (4077) is longer than the context "
                                         "(4096: max_position_embeddings, or a RoPE scaling's extended length)"),
]


@pytest.mark.parametrize("argument, value, error, message", GENERATE_CASES)
def test_generate_refuses_bad_arguments(ours, argument, value, error, message):
    seen = []
    kw = dict(make_batch(IMAGE_ROW), max_new_tokens=4, on_token=seen.append)
    kw[argument] = value
    raises(error, message, generate, ours, **kw)
    assert seen == []                                          # not one token was produced


def test_generate_with_a_tiny_temperature_is_greedy(ours):
    kw = make_batch(IMAGE_ROW)
    assert torch.equal(generate(ours, **kw, max_new_tokens=5, temperature=1e-300, eos_ids=()),
                       generate(ours, **kw, max_new_tokens=5, temperature=0.0, eos_ids=()))


# ------------------------------------------------------------------------------------------------ chat template
def test_lone_surrogate_is_replaced_in_every_turn(small_tok):
    for role in ("user", "assistant", "system", "tool"):
        chat = [{"role": "user", "content": "hi"}] if role == "tool" else []
        ids, mask = small_tok.apply_chat_template(chat + [{"role": role, "content": "a\ud800b"}],
                                                  return_assistant_mask=True)
        same = small_tok.apply_chat_template(chat + [{"role": role, "content": "a\ufffdb"}])
        assert ids == same and len(mask) == len(ids)
    assert small_tok.decode(small_tok.encode("x\ud83d\ude00y")) == "x\U0001F600y"   # a surrogate pair is its character


@pytest.mark.parametrize("messages, error, message", [
    ("hello", TypeError, "messages=str: must be a list of message dicts"),
    (["hello"], TypeError, "messages[0]='hello': must be a dict with 'role' and 'content'"),
    ([{"content": "hi"}], ValueError, "message 0 has role None; expected system, user, assistant or tool"),
    ([{"role": "user", "content": 42}], TypeError, "user message content=42: must be a string, a list of items or "
                                                   "None"),
    ([{"role": "user", "content": [{"type": "text", "text": None}]}], TypeError,
     "text item {'type': 'text', 'text': None}: 'text' must be a string"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"arguments": {}}]}], TypeError,
     "message 0 tool_calls[0]={'arguments': {}}: must be a dict with 'name' (a string) and 'arguments'"),
    ([{"role": "assistant", "content": "", "tool_calls": ["call"]}], TypeError,
     "message 0 tool_calls[0]='call': must be a dict with 'name' (a string) and 'arguments'"),
])
def test_malformed_messages(small_tok, messages, error, message):
    raises(error, message, small_tok.apply_chat_template, messages)


# ------------------------------------------------------------------------------------------------ processor
@pytest.mark.parametrize("conversations, error, message", [
    ([], ValueError, "conversations=[]: must hold at least one chat"),
    ("describe", TypeError, "conversations=str: must be a list of chats (lists of messages)"),
    ([{"role": "user", "content": [{"type": "video"}]}], TypeError,
     "a video must be a path, a [T, H, W, 3] uint8 array or a list of frames, got NoneType"),
    ([{"role": "user", "content": [{"type": "video", "video": [], "fps": 2}]}], ValueError, "the video has no frames"),
    ([{"role": "user", "content": [{"type": "video", "video": np.zeros((4, 64, 64, 3), np.uint8), "fps": 0}]}],
     ValueError, "fps=0: must be a finite number in [0.001, 1000.0]"),
    ([{"role": "user", "content": [{"type": "video", "video": np.zeros((4, 64, 64, 3), np.uint8), "fps": math.nan}]}],
     ValueError, "fps=nan: must be a finite number in [0.001, 1000.0]"),
    ([{"role": "user", "content": [{"type": "image"}]}], TypeError,
     "an image must be a path, a PIL image or a numpy array, got NoneType"),
])
def test_processor_refuses_malformed_chats(small_tok, conversations, error, message):
    raises(error, message, Processor(small_tok), conversations)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(video_max_pixels=10**12), ValueError, "video_max_pixels=1000000000000: must be an integer in [1, 100663296]"),
    (dict(video_fps=0), ValueError, "video_fps=0: must be a finite number in [0.001, 1000.0]"),
    (dict(video_min_frames=8, video_max_frames=4), ValueError,
     "video_min_frames=8, video_max_frames=4: need video_min_frames <= video_max_frames"),
    (dict(image_std=0), ValueError, "image_std=0: must be a finite number > 0"),
    (dict(patch_size=0), ValueError, "patch_size=0: must be an integer in [1, 256]"),
])
def test_processor_settings(small_tok, kwargs, error, message):
    raises(error, message, Processor, small_tok, **kwargs)


# ------------------------------------------------------------------------------------------------ command line
@pytest.fixture
def never_loaded(monkeypatch):
    """Fails the test if the command line loads a model; returns the list of attempts."""
    calls = []
    monkeypatch.setattr(sample.Qwen3VL, "from_pretrained", classmethod(lambda cls, *a, **k: calls.append(a)))
    return calls


def cli(tmp_path, *flags):
    return ["--init_from", str(tmp_path), "--prompt", "hi", "--device", "cpu", *flags]


@pytest.mark.parametrize("flags, error, message", [
    (["--max_new_tokens", "0"], ValueError, "--max_new_tokens=0: must be an integer >= 1"),
    (["--temperature", "-1"], ValueError, "--temperature=-1.0: must be a finite number >= 0"),
    (["--top_p", "0"], ValueError, "--top_p=0.0: must be a finite number in (0, 1]"),
    (["--top_k", "-5"], ValueError, "--top_k=-5: must be an integer >= 0"),
    (["--repetition_penalty", "nan"], ValueError, "--repetition_penalty=nan: must be a finite number in [0.001, "
                                                  "1000.0]"),
    (["--seed", "-1"], ValueError, "--seed=-1: must be an integer in [0, 18446744073709551615]"),
    (["--image", "{tmp}/missing.png"], FileNotFoundError, "--image '{tmp}/missing.png': no such file"),
    (["--video", "{tmp}/missing.mp4"], FileNotFoundError, "--video '{tmp}/missing.mp4': no such file"),
    (["--ground"], ValueError, "--ground draws onto an image: give --image"),
    (["--image", "{tmp}/a.png", "--ground", "{tmp}/no/such/dir/out.png"], FileNotFoundError,
     "--ground '{tmp}/no/such/dir/out.png': no such directory"),
    (["--compile"], ValueError, "--compile decodes with a CUDA graph: it needs --device cuda"),
    (["--device", "toaster"], ValueError, "--device 'toaster': not a torch device (e.g. cpu, cuda, cuda:1)"),
])
def test_command_line_checks_before_loading(tmp_path, never_loaded, flags, error, message):
    (tmp_path / "a.png").write_bytes(b"")
    flags = [f.format(tmp=tmp_path) for f in flags]
    before = digest(tmp_path)
    raises(error, message.format(tmp=tmp_path), main, cli(tmp_path, *flags))
    assert never_loaded == [] and digest(tmp_path) == before


def test_command_line_refuses_a_bad_image_or_budget_before_loading(tmp_path, never_loaded, small_tok):
    small_tok.save(tmp_path / "tokenizer.tiktoken")
    (tmp_path / "notes.png").write_text("not an image")
    raises(ValueError, f"{tmp_path}/notes.png is not an image file (PIL cannot identify it)",
           main, cli(tmp_path, "--image", str(tmp_path / "notes.png")))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"max_pixels": 10**10}))
    raises(ValueError, f"{str(tmp_path / 'preprocessor_config.json')!r}: max_pixels=10000000000: must be an integer "
                       "in [1, 67108864]", main, cli(tmp_path))
    assert never_loaded == []


def test_command_line_error_is_one_line(tmp_path):
    """Run as a script: a missing image is one line on stderr, exit status 1, before the (broken) checkpoint is read."""
    (tmp_path / "config.json").write_text("{broken")
    result = subprocess.run([sys.executable, "sample.py", "--init_from", str(tmp_path), "--prompt", "hi",
                             "--device", "cpu", "--image", str(tmp_path / "missing.png")],
                            cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == f"sample.py: error: --image '{tmp_path}/missing.png': no such file\n"
