"""
Image processing against the references (transformers 5 Qwen2VLImageProcessorPil / Qwen2VLImageProcessor (its PIL
and torchvision backends), Qwen3VLProcessor, qwen-vl-utils 0.0.14) on the real photographs shipped with
scikit-image, plus bad inputs and grounding helpers.

Measured: our pixel values equal the PIL reference exactly (max |diff| = 0) on every image, size and setting
tested here; against the torchvision (antialiased) reference the max |diff| is 0.086 (11 uint8 levels after
normalisation to [-1, 1]) and the mean |diff| at most 0.0016.
"""
import math
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image

import processor as P
from processor import Processor, coords_to_1000, coords_to_pixels, draw_grounding, parse_grounding, smart_resize
from test_tokenizer import hf_render, qwen_hf_tokenizer, qwen_tokenizer

SKIMAGE_DATA = os.path.join(os.path.dirname(__import__("skimage").__file__), "data")


def photo(name):
    return Image.open(os.path.join(SKIMAGE_DATA, f"{name}.png"))


@pytest.fixture(scope="module")
def tok():
    return qwen_tokenizer()


# ------------------------------------------------------------------------------------------------ smart_resize
def test_smart_resize_reference_examples():
    # Reference §5.1 examples with the released settings (factor 32, 65536..16777216 pixels).
    assert smart_resize(480, 640) == (480, 640)
    assert smart_resize(224, 224) == (256, 256)
    assert smart_resize(1365, 2048) == (1376, 2048)
    assert smart_resize(1080, 1920) == (1088, 1920)
    assert smart_resize(4000, 6000) == (3328, 4992)
    assert smart_resize(48, 80, factor=32, min_pixels=1) == (64, 64)        # round half to even: 80/32 = 2.5 -> 2


SIZES = [(h, w) for h in (1, 7, 16, 17, 31, 33, 48, 100, 224, 333, 480, 517, 1080, 4000)
         for w in (1, 15, 16, 40, 64, 250, 640, 1001, 1920, 6000)]
BUDGETS = [(65536, 16777216), (4096, 16777216), (1024, 16384), (56 * 56, 28 * 28 * 1280), (100, 100)]


def test_smart_resize_matches_transformers_and_qwen_vl_utils():
    from qwen_vl_utils.vision_process import smart_resize as utils_resize
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_resize
    checked = 0
    for factor in (32, 28):
        for min_pixels, max_pixels in BUDGETS:
            for h, w in SIZES:
                if max(h, w) / min(h, w) > 200:
                    with pytest.raises(ValueError, match="aspect ratio"):
                        smart_resize(h, w, factor, min_pixels, max_pixels)
                    continue
                ours = smart_resize(h, w, factor, min_pixels, max_pixels)
                assert ours == hf_resize(h, w, factor, min_pixels, max_pixels), (h, w, factor)
                # qwen-vl-utils differs on degenerate sizes: it clamps round(side / factor) to >= 1 (so it
                # differs when a side <= factor / 2) but not floor(...) when shrinking (a side can become 0).
                utils = utils_resize(h, w, factor, min_pixels, max_pixels)
                if min(h, w) > factor / 2 and min(utils) > 0:
                    assert ours == utils, (h, w, factor)
                    checked += 1
    assert checked > 300


@settings(max_examples=500, deadline=None)
@given(h=st.integers(1, 20000), w=st.integers(1, 20000), factor=st.sampled_from([28, 32]),
       min_tokens=st.integers(1, 256), extra=st.integers(0, 20000))
def test_smart_resize_invariants(h, w, factor, min_tokens, extra):
    min_pixels, max_pixels = min_tokens * factor ** 2, (min_tokens + extra) * factor ** 2
    if max(h, w) / min(h, w) > 200:
        with pytest.raises(ValueError, match="at most 200"):
            smart_resize(h, w, factor, min_pixels, max_pixels)
        return
    hb, wb = smart_resize(h, w, factor, min_pixels, max_pixels)
    assert hb % factor == 0 and wb % factor == 0 and hb >= factor and wb >= factor
    rounded = (round(h / factor) * factor, round(w / factor) * factor)
    clamped = factor in (hb, wb)                                             # a side pinned at the minimum
    if rounded[0] * rounded[1] > max_pixels:                                 # shrunk into the budget
        assert hb * wb <= max_pixels or clamped
    elif rounded[0] * rounded[1] < min_pixels:                               # enlarged into the budget
        assert hb * wb >= min_pixels
    else:                                                                    # within it: only rounded
        assert (hb, wb) == rounded
    if not clamped:                                                          # aspect ratio kept up to rounding
        assert abs(math.log((hb / wb) / (h / w))) <= math.log1p(factor / (hb - factor)) + math.log1p(
            factor / (wb - factor)) + 1e-9 if min(hb, wb) > factor else True


# ------------------------------------------------------------------------------------------------ patch order
def test_patchify_layout():
    # Each pixel's value spells out its channel, frame, row and column (a 2-frame 64x64 clip).
    T, C, H, W = 2, 3, 64, 64
    t, c, y, x = torch.meshgrid(torch.arange(T), torch.arange(C), torch.arange(H), torch.arange(W), indexing="ij")
    frames = (c * 1_000_000 + t * 100_000 + y * 1000 + x).double()          # [T, C, H, W]
    rows, grid = P.patchify(frames)
    assert grid == (1, 4, 4) and rows.shape == (16, 3 * 2 * 16 * 16)
    patch_origins = [(0, 0), (0, 16), (16, 0), (16, 16), (0, 32), (0, 48), (16, 32), (16, 48)]  # 2x2 blocks, row-major
    for r, (y0, x0) in enumerate(patch_origins):
        row = rows[r].view(C, 2, 16, 16)                                     # (c, t, py, px)
        assert row[0, 0, 0, 0] == y0 * 1000 + x0
        assert row[1, 0, 2, 7] == 1_000_000 + (y0 + 2) * 1000 + x0 + 7
        assert row[2, 1, 3, 5] == 2_000_000 + 100_000 + (y0 + 3) * 1000 + x0 + 5


# ------------------------------------------------------------------------------------------------ images
PHOTOS = ["astronaut", "coffee", "chelsea", "motorcycle_left", "camera", "page", "ihc", "color", "horse"]
RESHAPES = [(17, 900), (900, 17), (333, 517), (64, 64), (100, 75), (250, 40), (41, 1000)]   # (h, w) inputs
SETTINGS = [  # our Processor settings (the reference gets the same), the photos, and whether each is also reshaped
    (dict(min_pixels=32 * 32, max_pixels=128 * 128), PHOTOS, True),           # the toy model's tiny images
    (dict(min_pixels=4096, max_pixels=96 * 96, patch_size=14), PHOTOS[:3], True),
    (dict(), ["astronaut", "chelsea"], False),                                # released settings (big outputs)
]


def reference_image_processors(s):
    """The reference's image processors with our settings: (PIL backend, torchvision backend)."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLImageProcessorPil
    kw = dict(patch_size=s.get("patch_size", 16), temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3,
              image_std=[0.5] * 3, size={"shortest_edge": s.get("min_pixels", 65536),
                                          "longest_edge": s.get("max_pixels", 16777216)})
    return Qwen2VLImageProcessorPil(**kw), Qwen2VLImageProcessor(**kw)


@pytest.mark.parametrize("setting", range(len(SETTINGS)))
def test_images_match_reference(tok, setting):
    s, photos, reshape = SETTINGS[setting]
    ours = Processor(tok, **s)
    pil, torchvision = reference_image_processors(s)
    worst_fast, mean_fast = 0.0, 0.0
    for k, name in enumerate(photos):
        base = P.to_rgb(photo(name))            # horse.png is RGBA: composite first (the reference drops alpha)
        size = RESHAPES[k % len(RESHAPES)]      # each photo once as it is and once squeezed to another shape
        for image in [base] + ([base.resize((size[1], size[0]), Image.Resampling.BICUBIC)] if reshape else []):
            rows, grid = ours.process_image(image)
            ref = pil(images=[image], return_tensors="pt")
            ref_fast = torchvision(images=[image], return_tensors="pt")
            assert [list(grid)] == ref["image_grid_thw"].tolist() == ref_fast["image_grid_thw"].tolist()
            assert rows.dtype == torch.float32 and rows.shape == ref["pixel_values"].shape
            torch.testing.assert_close(rows, ref["pixel_values"], atol=1e-6, rtol=0)
            diff = (rows - ref_fast["pixel_values"]).abs()
            worst_fast, mean_fast = max(worst_fast, diff.max().item()), max(mean_fast, diff.mean().item())
    assert worst_fast <= 0.09 and mean_fast <= 0.002, (worst_fast, mean_fast)


def test_processor_batch_matches_reference_processor(tok):
    from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor
    hf_tok, _ = qwen_hf_tokenizer()
    s = dict(min_pixels=32 * 32, max_pixels=160 * 160)
    pil, _ = reference_image_processors(s)
    reference = Qwen3VLProcessor(image_processor=pil, tokenizer=hf_tok, video_processor=Qwen3VLVideoProcessor())
    astronaut, coffee = photo("astronaut"), photo("coffee")
    chats = [
        [{"role": "user", "content": [{"type": "image", "image": astronaut}, {"type": "text", "text": "Who?"}]},
         {"role": "assistant", "content": "An astronaut."}],
        [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": [{"type": "text", "text": "Compare:"}, {"type": "image", "image": coffee},
                                      {"type": "image", "image": np.asarray(astronaut)}]}],
        [{"role": "user", "content": "No image here."}],
    ]
    batch = Processor(tok, **s)(chats, add_generation_prompt=True, add_vision_id=True)
    images = [astronaut, coffee, astronaut]
    ref = reference(text=[hf_render(hf_tok, c, add_generation_prompt=True, add_vision_id=True) for c in chats],
                    images=images, return_tensors="pt", padding=True)
    mask = batch["attention_mask"].bool()
    for b in range(len(chats)):
        ref_ids = ref["input_ids"][b][ref["attention_mask"][b].bool()]
        assert batch["input_ids"][b][mask[b]].tolist() == ref_ids.tolist()
    assert batch["image_grid_thw"].tolist() == ref["image_grid_thw"].tolist() == [[1, 10, 10], [1, 8, 12],
                                                                                    [1, 10, 10]]
    torch.testing.assert_close(batch["pixel_values"], ref["pixel_values"], atol=1e-6, rtol=0)
    assert batch["pixel_values_videos"] is None and batch["video_grid_thw"] is None


def test_batch_layout_left_padding_and_labels(tok):
    chats = [[{"role": "user", "content": [{"type": "image", "image": photo("chelsea")},
                                           {"type": "text", "text": "?"}]},
              {"role": "assistant", "content": "A cat."}],
             [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]]
    p = Processor(tok, min_pixels=32 * 32, max_pixels=64 * 64)
    batch = p(chats, return_text=True)
    ids, att, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.dtype == att.dtype == labels.dtype == torch.long and ids.shape == att.shape == labels.shape
    n_pad = (att[1] == 0).sum().item()
    assert n_pad > 0 and att[0].all() and not att[1, :n_pad].any() and att[1, n_pad:].all()   # left padding
    assert (ids[1, :n_pad] == tok.pad_id).all() and (labels[1, :n_pad] == -100).all()
    for b, answer in enumerate(["A cat.<|im_end|>", "Hello!<|im_end|>"]):
        trained = labels[b] != -100
        assert (labels[b][trained] == ids[b][trained]).all()
        assert tok.decode(ids[b][trained].tolist()) == answer
    grid = batch["image_grid_thw"][0].tolist()
    assert (ids == tok.image_token_id).sum().item() == math.prod(grid) // 4
    assert batch["pixel_values"].shape == (math.prod(grid), 1536)
    assert batch["text"][0].startswith("<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|>")
    single = p(chats[1])                                                     # one chat alone = a batch of one
    assert single["input_ids"].tolist() == [ids[1, n_pad:].tolist()] and single["pixel_values"] is None


# ------------------------------------------------------------------------------------------------ image inputs
def test_image_modes_are_converted(tmp_path):
    from qwen_vl_utils.vision_process import to_rgb as utils_to_rgb
    rgba = photo("horse")                                                    # a real RGBA image
    assert rgba.mode == "RGBA"
    assert np.array_equal(np.asarray(P.load_image(rgba)), np.asarray(utils_to_rgb(rgba)))  # on white, as qwen-vl-utils
    transparent = Image.new("RGBA", (20, 20), (255, 0, 0, 0))
    assert np.asarray(P.load_image(transparent)).min() == 255                 # fully transparent -> white
    la = Image.new("LA", (20, 20), (0, 128))                                  # black at half opacity on white
    assert np.asarray(P.load_image(la))[0, 0].tolist() == [127, 127, 127]
    palette = Image.new("P", (20, 20), 3)
    palette.putpalette([0, 0, 0, 10, 20, 30, 0, 0, 0, 200, 100, 50] + [0] * 756)
    assert np.asarray(P.load_image(palette))[0, 0].tolist() == [200, 100, 50]
    palette.info["transparency"] = 3                                          # a transparent palette index
    assert np.asarray(P.load_image(palette))[0, 0].tolist() == [255, 255, 255]
    grey = photo("camera")
    rgb = np.asarray(P.load_image(grey))
    assert rgb.shape == (512, 512, 3) and (rgb == np.asarray(grey)[..., None]).all()
    deep = np.array([[0, 257, 32896, 65535]], dtype=np.uint16).repeat(4, 0)  # 16-bit greyscale
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    assert np.asarray(P.load_image(tmp_path / "deep.png"))[0, :, 0].tolist() == [0, 1, 128, 255]
    assert np.asarray(P.load_image(deep))[0, :, 1].tolist() == [0, 1, 128, 255]
    assert np.asarray(P.load_image(np.zeros((5, 6, 4), np.uint8))).min() == 255   # RGBA array, alpha 0
    assert P.load_image(np.zeros((5, 6), np.uint8)).size == (6, 5)


def tiny_png(width, height):
    """A PNG with only a header (IHDR) that declares width x height: enough for PIL's size checks."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_bad_images_raise_clear_errors(tok, tmp_path):
    p = Processor(tok)
    photo("astronaut").save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:len(data) // 2])
    photo("coffee").save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[:len(data) // 3])
    (tmp_path / "notes.png").write_text("this is not an image")
    (tmp_path / "bomb.png").write_bytes(tiny_png(30000, 30000))             # 9e8 px > 2 x PIL's 89.5M limit
    for name, message in [("cut.png", "truncated or corrupt"), ("cut.jpg", "truncated or corrupt"),
                          ("notes.png", "not an image file"), ("bomb.png", "decompression bomb")]:
        with pytest.raises(ValueError, match=message):
            p.process_image(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        p.process_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="aspect ratio 206.2; Qwen3-VL accepts at most 200"):
        p.process_image(np.zeros((16, 3300, 3), np.uint8))
    with pytest.raises(ValueError, match="1x1 image is smaller than one 16 px patch"):
        p.process_image(Image.new("RGB", (1, 1)))
    with pytest.raises(ValueError, match="URLs are not fetched"):
        p.process_image("https://example.com/cat.png")
    with pytest.raises(ValueError, match="uint8 .* or uint16"):
        p.process_image(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="channels last"):
        p.process_image(np.zeros((3, 32, 32), np.uint8))
    with pytest.raises(TypeError, match="path, a PIL image or a numpy array"):
        p.process_image(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="min_pixels <= max_pixels"):
        Processor(tok, min_pixels=100, max_pixels=10)


# ------------------------------------------------------------------------------------------------ grounding
def test_coordinates_round_trip():
    assert coords_to_pixels([100, 200, 500, 1000], width=640, height=480) == [64.0, 96.0, 320.0, 480.0]
    assert coords_to_pixels([500, 250], width=640, height=480) == [320.0, 120.0]
    assert coords_to_1000([64, 96, 320, 480], width=640, height=480) == [100, 200, 500, 1000]
    assert coords_to_1000([-5, 500], width=640, height=480) == [0, 1000]             # clamped
    rng = np.random.default_rng(0)
    for _ in range(100):
        w, h = rng.integers(16, 4000, 2)
        box = sorted(rng.integers(0, 1001, 2).tolist()) + sorted(rng.integers(0, 1001, 2).tolist())
        assert coords_to_1000(coords_to_pixels(box, w, h), w, h) == box


def test_parse_grounding():
    fenced = ('Sure!\n```json\n[\n  {"bbox_2d": [10, 20, 300, 400], "label": "cat"},\n'
              '  {"point_2d": [500, 600], "label": "eye"}\n]\n```\nAnything else?')
    assert parse_grounding(fenced) == [{"bbox_2d": [10, 20, 300, 400], "label": "cat"},
                                       {"point_2d": [500, 600], "label": "eye"}]
    assert parse_grounding('{"bbox_2d": [1, 2, 3, 4], "label": "dog"} trailing text') == [
        {"bbox_2d": [1, 2, 3, 4], "label": "dog"}]
    cut = '```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [5, 6, 7, 8], "label": "b"}, {"bbox_2d": [9,'
    assert [d["label"] for d in parse_grounding(cut)] == ["a", "b"]         # generation stopped mid-list
    assert parse_grounding('[{"bbox_2d": [1, 2, 3]}, {"point_2d": ["x", 1]}, {"label": "none"}]') == []
    assert parse_grounding("I cannot see any cat.") == []


def test_draw_grounding(tmp_path):
    image = Image.new("RGB", (200, 100), (0, 0, 0))
    items = parse_grounding('[{"bbox_2d": [100, 200, 500, 800], "label": "box"}, {"point_2d": [900, 500]}]')
    drawn = draw_grounding(image, items, path=tmp_path / "out.png")
    a = np.asarray(drawn)
    assert a[20, 20:100].any(axis=-1).all() and a[50, 20].any()              # box edges at x 20..100, y 20..80
    assert not a[50, 60].any()                                               # inside the box: untouched
    assert a[50, 180].any()                                                  # the point at (180, 50)
    assert not np.asarray(image).any()                                       # the input is not modified
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png")), a)
