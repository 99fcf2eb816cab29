"""
Fuzzing the boundaries with hypothesis: whatever chats, texts, images and videos the processor and the tokenizer
are given, and whatever arguments generate is given, the only exceptions are the documented ones (TypeError,
ValueError, and FileNotFoundError for a path that does not exist); what succeeds is well-formed.
"""
import math

import numpy as np
import pytest
import torch
from conftest import make_batch
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from processor import Processor
from sample import generate
from tokenizer import Tokenizer

DOCUMENTED = (TypeError, ValueError, FileNotFoundError)     # exactly these: no subclass (UnicodeEncodeError) either


def documented(error):
    assert type(error) in DOCUMENTED, f"undocumented {type(error).__name__}: {error}"

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

# any text, with lone UTF-16 surrogates (hypothesis leaves them out by default) and special-token strings
texts = st.lists(st.one_of(st.characters(), st.characters(categories=["Cs"]), st.sampled_from(
    ["<|im_end|>", "<|image_pad|>", "<think>", "\n", " "])), max_size=12).map("".join)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), texts)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["fuzzing a tiny byte-level BPE: words, numbers 123 and ünïcödé"] * 4, 320)


# ------------------------------------------------------------------------------------------------ inputs
def mostly(good, bad):
    """`good` seven times in eight, else `bad`: deep cases need well-formed outer layers to be reached."""
    return st.integers(0, 7).flatmap(lambda i: bad if i == 7 else good)


def arrays(dims):
    """Numpy arrays with `dims` sizes (each 0..72) and a dtype that is mostly uint8."""
    shape = st.tuples(*[st.integers(0, 72)] * dims) if isinstance(dims, int) else dims
    dtype = mostly(st.just(np.uint8), st.sampled_from([np.uint16, np.float32, np.int64, bool]))
    return st.builds(lambda s, t, fill: np.full(s, fill).astype(t), shape, dtype, st.integers(0, 300))


pil_images = st.builds(Image.new, st.sampled_from(["RGB", "RGBA", "L", "P", "I;16", "1", "CMYK", "LA"]),
                       st.tuples(st.integers(1, 80), st.integers(1, 80)))
images = mostly(st.one_of(arrays(st.tuples(st.integers(0, 80), st.integers(0, 80), st.sampled_from([1, 3, 4]))),
                          arrays(2), pil_images),
                st.one_of(arrays(st.lists(st.integers(0, 8), max_size=4).map(tuple)), texts, scalars))
videos = mostly(st.one_of(arrays(st.tuples(st.integers(0, 6), st.integers(0, 72), st.integers(0, 72), st.just(3))),
                          st.lists(mostly(arrays(st.tuples(st.just(40), st.just(48), st.just(3))), images),
                                   max_size=4)),
                st.one_of(arrays(3), texts, scalars))
fps = mostly(st.floats(0.5, 60), st.one_of(st.floats(), st.integers(-5, 10**6), scalars))
items = mostly(st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": mostly(texts, scalars)}),
    st.fixed_dictionaries({"type": st.just("image"), "image": images}),
    st.fixed_dictionaries({"type": st.just("video"), "video": videos}, optional={"fps": fps})),
    st.one_of(st.dictionaries(st.sampled_from(["type", "text", "image", "video", "audio"]), scalars, max_size=3),
              scalars))
tool_calls = st.lists(mostly(
    st.fixed_dictionaries({"name": mostly(texts, scalars),
                           "arguments": st.one_of(texts, st.dictionaries(texts, scalars, max_size=2), scalars)}),
    scalars), max_size=2)
messages = st.lists(mostly(
    st.fixed_dictionaries({"role": mostly(st.sampled_from(["system", "user", "assistant", "tool"]),
                                          st.one_of(st.just("bot"), scalars)),
                           "content": mostly(st.one_of(texts, st.lists(items, max_size=3)), scalars)},
                          optional={"tool_calls": tool_calls}),
    scalars), max_size=4)


# ------------------------------------------------------------------------------------------------ tests
@FUZZ
@given(chat=messages, add_generation_prompt=st.booleans(), tools=st.one_of(st.none(), st.lists(
    st.dictionaries(texts, scalars, max_size=2), max_size=2)))
def test_processor_raises_only_documented_errors(tok, chat, add_generation_prompt, tools):
    processor = Processor(tok, min_pixels=32 * 32, max_pixels=64 * 64, video_max_pixels=4 * 64 * 64)
    try:
        batch = processor([chat], add_generation_prompt=add_generation_prompt, tools=tools)
    except Exception as error:
        return documented(error)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape == batch["labels"].shape and ids.min() >= 0 and ids.max() < tok.n_vocab
    for pixels, grid in ((batch["pixel_values"], batch["image_grid_thw"]),
                         (batch["pixel_values_videos"], batch["video_grid_thw"])):
        if pixels is not None:
            assert pixels.isfinite().all() and pixels.shape[0] == int(grid.prod(-1).sum())


@FUZZ
@given(image=images, video=videos, video_fps=fps)
def test_images_and_videos_raise_only_documented_errors(tok, image, video, video_fps):
    processor = Processor(tok, min_pixels=32 * 32, max_pixels=64 * 64, video_max_pixels=4 * 64 * 64)
    for process, args in ((processor.process_image, (image,)), (processor.process_video, (video, video_fps))):
        try:
            rows, grid, *_ = process(*args)
        except Exception as error:
            documented(error)
            continue
        assert rows.isfinite().all() and rows.shape == (math.prod(grid), 1536)
        assert grid[1] % 2 == 0 and grid[2] % 2 == 0 and grid[1] * grid[2] * 256 <= 4 * 64 * 64


@FUZZ
@given(chat=messages, text=texts, ids=st.lists(st.integers(-2**40, 2**40), max_size=8))
def test_tokenizer_raises_only_documented_errors(tok, chat, text, ids):
    assert tok.decode(tok.encode(text)) == tok.decode(tok.encode(tok.decode(tok.encode(text))))
    assert isinstance(tok.decode(ids), str)                    # ids outside the vocabulary decode to nothing
    try:
        ids, mask = tok.apply_chat_template(chat, return_assistant_mask=True)
    except Exception as error:
        return documented(error)
    assert len(ids) == len(mask) and all(0 <= i < tok.n_vocab for i in ids)


numbers = st.one_of(st.integers(-3, 5), st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(
    [0, 1e-300, 1e-6, 0.5, 1, 1e300, -0.0]), st.none(), st.booleans(), st.just("1"))


@settings(max_examples=80, deadline=None, derandomize=True)
@given(max_new_tokens=mostly(st.integers(1, 4), numbers), temperature=mostly(st.floats(0, 3), numbers),
       top_k=mostly(st.integers(0, 10**6), numbers), top_p=mostly(st.floats(1e-9, 1), numbers),
       repetition_penalty=mostly(st.floats(1e-3, 1e3), numbers), presence_penalty=mostly(st.floats(-1e6, 1e6), numbers),
       eos_ids=mostly(st.lists(st.integers(0, 151935), max_size=2), st.one_of(
           st.lists(st.integers(-5, 200_000), max_size=2), numbers)), pad_id=mostly(st.integers(-1, 151935), st.one_of(numbers, st.integers())))
def test_generate_raises_only_documented_errors(pair, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                                                 presence_penalty, eos_ids, pad_id):
    kw = make_batch([[("text", 4)], [("text", 6)]])
    seen = []
    try:
        out = generate(pair[1], **kw, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                       top_p=top_p, repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                       eos_ids=eos_ids, pad_id=pad_id, generator=torch.Generator().manual_seed(0),
                       on_token=seen.append)
    except Exception as error:
        assert seen == []                                    # refused before the first token
        return documented(error)
    assert out.shape == (2, max_new_tokens) and 1 <= len(seen) <= max_new_tokens
    real = out[out != pad_id]
    assert ((real >= 0) & (real < pair[1].cfg.text.vocab_size)).all()
