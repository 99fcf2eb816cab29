"""
Shared test helpers: a tiny random reference model (Hugging Face transformers, the oracle) and ours loaded from
its checkpoint through our own loader, plus builders of multimodal inputs.
"""
import pytest
import torch

IMG, VID, VS, VE = 151655, 151656, 151652, 151653       # <|image_pad|> <|video_pad|> <|vision_start|> <|vision_end|>


def tiny_hf_config(tie=False, **text_overrides):
    from transformers import Qwen3VLConfig as HFConfig
    text = dict(vocab_size=151936, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                rope_theta=5_000_000.0, max_position_embeddings=4096, tie_word_embeddings=tie,
                rope_scaling={"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True})
    text.update(text_overrides)
    vision = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                  deepstack_visual_indexes=[0, 1, 2], num_position_embeddings=2304)
    return HFConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie)


def randomize_(module, seed=0):
    """Every parameter random (norm weights around 1), so that a swapped or dropped tensor cannot go unseen."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.05 * noise)
    return module


def build_pair(tmp_path, tie=False, seed=0, **text_overrides):
    """(reference model, our model) with identical weights, ours loaded from the reference's saved checkpoint."""
    from transformers import Qwen3VLForConditionalGeneration
    from model import Qwen3VL
    torch.manual_seed(seed)
    ref = Qwen3VLForConditionalGeneration(tiny_hf_config(tie, **text_overrides)).eval()
    randomize_(ref, seed)
    ref.save_pretrained(tmp_path / "ref")
    ours = Qwen3VL.from_pretrained(tmp_path / "ref").eval()
    return ref, ours


def text_ids(n, g):
    return torch.randint(0, 151643, (n,), generator=g).tolist()


def image_block(grid, merge=2):
    t, h, w = grid
    return [VS] + [IMG] * (t * h * w // merge ** 2) + [VE]


def video_blocks(grid, g, merge=2):
    """Per frame group: a text timestamp (3 ordinary tokens), then <|vision_start|> pads <|vision_end|>."""
    t, h, w = grid
    ids = []
    for _ in range(t):
        ids += text_ids(3, g) + [VS] + [VID] * (h * w // merge ** 2) + [VE]
    return ids


def pixels(grid, g):
    t, h, w = grid
    return torch.randn(t * h * w, 3 * 2 * 16 * 16, generator=g)


def make_row(parts, g):
    """parts: list of ('text', n) | ('image', (t,h,w)) | ('video', (t,h,w)) -> ids, image grids/pixels, video grids/pixels."""
    ids, img_g, img_p, vid_g, vid_p = [], [], [], [], []
    for kind, arg in parts:
        if kind == "text":
            ids += text_ids(arg, g)
        elif kind == "image":
            ids += image_block(arg)
            img_g.append(arg)
            img_p.append(pixels(arg, g))
        else:
            ids += video_blocks(arg, g)
            vid_g.append(arg)
            vid_p.append(pixels(arg, g))
    return ids, img_g, img_p, vid_g, vid_p


def reference_inputs(kw):
    """The reference's inputs for our model kwargs: transformers 5 also takes mm_token_type_ids (0 text, 1 image,
    2 video token), which its processor returns and its 3-D positions are placed by."""
    ids = kw["input_ids"]
    return {**kw, "mm_token_type_ids": (ids == IMG).long() + 2 * (ids == VID).long()}


def short_of_image_features():
    """A batch whose image has 6 placeholder tokens ((1, 4, 6) grid) but pixels and grid of a (1, 4, 4) image: 4
    features. Returns (model kwargs, the error the model must raise)."""
    kw = make_batch([[("text", 5), ("image", (1, 4, 6)), ("text", 7)]])
    kw = dict(kw, image_grid_thw=torch.tensor([[1, 4, 4]]), pixel_values=kw["pixel_values"][:16])
    return kw, r"image placeholder tokens \(6\) do not match the image features \(4"


def make_batch(rows, seed=0):
    """rows: list of parts lists. Left-pads to one length (pad id 151643). Returns the model kwargs."""
    g = torch.Generator().manual_seed(seed)
    built = [make_row(parts, g) for parts in rows]
    S = max(len(b[0]) for b in built)
    input_ids = torch.full((len(rows), S), 151643, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), S, dtype=torch.long)
    for i, b in enumerate(built):
        input_ids[i, S - len(b[0]):] = torch.tensor(b[0])
        attention_mask[i, S - len(b[0]):] = 1
    kw = dict(input_ids=input_ids, attention_mask=attention_mask)
    img_g = [x for b in built for x in b[1]]
    vid_g = [x for b in built for x in b[3]]
    if img_g:
        kw.update(pixel_values=torch.cat([x for b in built for x in b[2]]), image_grid_thw=torch.tensor(img_g))
    if vid_g:
        kw.update(pixel_values_videos=torch.cat([x for b in built for x in b[4]]), video_grid_thw=torch.tensor(vid_g))
    return kw


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return build_pair(tmp_path_factory.mktemp("pair"))


@pytest.fixture
def flex_backward_on_cpu(monkeypatch):
    """torch refuses backward through FlexAttention on the CPU (a device guard: its eager implementation, a dense
    score matrix, differentiates exactly). Lifted for the tests that compare FlexAttention's gradients."""
    import torch.nn.attention.flex_attention as fa
    monkeypatch.setattr(fa, "_validate_device", lambda *tensors: None)
