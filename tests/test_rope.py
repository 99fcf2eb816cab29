"""rope.py against the reference: vision 2-D RoPE, interleaved MRoPE, 3-D position ids (reference §2.3, §3.4-3.5)."""
import torch
from conftest import IMG, VE, VID, VS, make_batch, reference_inputs
from test_vision import first_block_inputs

from rope import mrope_cos_sin, rope_frequencies, rope_index, vision_cos_sin
from vision import patch_coordinates


def ref_rope_index(ref, kw):
    return ref.model.get_rope_index(kw["input_ids"], reference_inputs(kw)["mm_token_type_ids"],
                                    kw.get("image_grid_thw"), kw.get("video_grid_thw"), kw["attention_mask"])


def assert_same_positions(kw, ours, ref):
    """Equal 3-D positions on real tokens (padding: ours 1 as 4.57, the reference's 5.x 0, neither read) and rope
    deltas that give the same decode positions: ours count the padding (4.57), 5.x's do not."""
    (pos, delta), (ref_pos, ref_delta) = ours, ref
    real = kw["attention_mask"].bool()
    assert torch.equal(pos[:, real], ref_pos[:, real])
    assert torch.equal(delta, ref_delta - (~real).sum(1, keepdim=True))


def ours_rope_index(kw):
    return rope_index(kw["input_ids"], kw["attention_mask"], kw.get("image_grid_thw"), kw.get("video_grid_thw"),
                      image_token_id=IMG, video_token_id=VID)


def test_rope_index_reference_example():
    """The worked example of reference §3.5: one image (1,4,6), one video (2,4,4), left padded by 3."""
    ids = [5, 6, 7, 100, 101, VS] + [IMG] * 6 + [VE, 102, 8, 9, VS] + [VID] * 4 + [VE, 8, 9, VS] + [VID] * 4 + [VE, 104, 105]
    T = [0, 1, 2, 3, 4, 5, 6, 6, 6, 6, 6, 6, 9, 10, 11, 12, 13, 14, 14, 14, 14, 16, 17, 18, 19, 20, 20, 20, 20, 22, 23, 24]
    H = [0, 1, 2, 3, 4, 5, 6, 6, 6, 7, 7, 7, 9, 10, 11, 12, 13, 14, 14, 15, 15, 16, 17, 18, 19, 20, 20, 21, 21, 22, 23, 24]
    W = [0, 1, 2, 3, 4, 5, 6, 7, 8, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 14, 15, 16, 17, 18, 19, 20, 21, 20, 21, 22, 23, 24]
    input_ids = torch.tensor([[151643] * 3 + ids])
    mask = torch.tensor([[0] * 3 + [1] * 32])
    pos, delta = rope_index(input_ids, mask, torch.tensor([[1, 4, 6]]), torch.tensor([[2, 4, 4]]),
                            image_token_id=IMG, video_token_id=VID)
    assert pos[:, 0, 3:].tolist() == [T, H, W]
    assert pos[:, 0, :3].tolist() == [[1] * 3] * 3         # padding gets 1, as in the reference
    assert delta.tolist() == [[25 - 35]]                    # against the padded length (reference v4)


def test_rope_index_matches_reference(pair):
    ref, _ = pair
    rows = [[("text", 4), ("image", (1, 4, 6)), ("text", 3), ("video", (3, 6, 4)), ("text", 2), ("image", (1, 2, 8))],
            [("text", 2), ("video", (2, 4, 4)), ("image", (1, 6, 6)), ("text", 9)],
            [("text", 11)],
            [("image", (1, 4, 4))]]
    kw = make_batch(rows, seed=3)
    assert (kw["attention_mask"] == 0).any()
    assert_same_positions(kw, ours_rope_index(kw), ref_rope_index(ref, kw))


def test_rope_index_text_only_equals_cumsum(pair):
    ref, _ = pair
    kw = make_batch([[("text", 7)], [("text", 3)]])
    pos, delta = ours_rope_index(kw)
    mask = kw["attention_mask"]
    assert torch.equal(pos[0], (mask.cumsum(1) - 1).masked_fill(mask == 0, 1)) and delta.tolist() == [[0], [-4]]
    assert_same_positions(kw, (pos, delta), ref_rope_index(ref, kw))


def test_mrope_interleaved_matches_reference(pair):
    ref, _ = pair
    kw = make_batch([[("text", 3), ("image", (1, 6, 8)), ("text", 5), ("video", (2, 4, 4))]])
    pos, _ = ours_rope_index(kw)
    rot = ref.model.language_model.rotary_emb
    x = torch.zeros(1, pos.shape[-1], 64)
    ref_cos, ref_sin = rot(x, pos)
    cos, sin = mrope_cos_sin(pos, rope_frequencies(16, 5_000_000.0), [4, 2, 2], layout="interleaved")
    torch.testing.assert_close(cos, ref_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, ref_sin, rtol=0, atol=1e-6)


def test_mrope_slot_layout_real_sizes():
    """head_dim 128, sections [24,20,20]: slots THW x20 then TTTT (interleaved); TTT..HHH..WWW (chunked); all T
    (text)."""
    pos = torch.stack([torch.full((1, 1), 1.0), torch.full((1, 1), 2.0), torch.full((1, 1), 3.0)]).long()
    theta = 5e6
    freqs = 1.0 / theta ** (torch.arange(0, 128, 2).float() / 128)
    for layout, axes in (("interleaved", [0, 1, 2] * 20 + [0] * 4), ("chunked", [0] * 24 + [1] * 20 + [2] * 20),
                         ("text", [0] * 64)):
        cos, _ = mrope_cos_sin(pos, rope_frequencies(128, theta), [24, 20, 20], layout)
        angle = torch.tensor([a + 1.0 for a in axes]) * freqs
        torch.testing.assert_close(cos[0, 0], torch.cat([angle, angle]).cos())


def test_mrope_text_is_1d_rope():
    pos = torch.arange(10)[None]
    cos3, sin3 = mrope_cos_sin(pos[None].expand(3, -1, -1), rope_frequencies(128, 5e6))
    cos1, sin1 = mrope_cos_sin(pos, rope_frequencies(128, 5e6))
    assert torch.equal(cos3, cos1) and torch.equal(sin3, sin1)


def test_vision_rope_and_coordinates_match_reference(pair):
    """cos/sin and attention segments against what the reference's first ViT block receives."""
    ref, _ = pair
    grid = torch.tensor([[1, 4, 6], [3, 8, 4], [1, 2, 2]])
    N = int(grid.prod(-1).sum())
    _, row, col, segment = patch_coordinates(grid, N, 2)
    cos, sin = vision_cos_sin(row, col, 16)
    _, kwargs = first_block_inputs(ref.model.visual, torch.randn(N, 1536), grid)
    ref_cos, ref_sin = kwargs["position_embeddings"]
    torch.testing.assert_close(cos, ref_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, ref_sin, rtol=0, atol=1e-6)
    # segments: one per frame group, in the order of the reference's cu_seqlens
    lengths = torch.repeat_interleave(grid[:, 1] * grid[:, 2], grid[:, 0])
    assert torch.equal(kwargs["cu_seqlens"].diff(), lengths.to(kwargs["cu_seqlens"].dtype))
    assert torch.equal(torch.bincount(segment), lengths)
    assert torch.equal(segment, torch.repeat_interleave(torch.arange(len(lengths)), lengths))
