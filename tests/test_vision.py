"""vision.py against the reference Qwen3-ViT (reference §2): patch embed, resampled position embedding,
2-D rotary block-diagonal attention over packed images, merger and DeepStack mergers. fp32, CPU."""
import copy

import pytest
import torch
from conftest import pixels

from vision import patch_coordinates

GRIDS = [
    [[1, 4, 6]],                              # one image
    [[1, 4, 6], [1, 8, 4], [1, 2, 2]],        # several images of different sizes, packed
    [[3, 6, 4]],                              # a video of 3 frame groups
    [[1, 2, 10], [2, 4, 4], [1, 10, 2]],      # images and a video, extreme aspect ratios
]


@pytest.fixture(params=["sdpa", "flex"])
def vit_impl(request, pair):
    """Each test below runs on both attention paths of the ViT (vision.VisionEncoder.attn_impl): dense batches per
    frame-group size, and FlexAttention over the whole packed sequence with a block mask of its segments."""
    _, ours = pair
    ours.visual.attn_impl = request.param
    yield request.param
    ours.visual.attn_impl = "auto"


@pytest.mark.parametrize("grid", GRIDS)
def test_vision_encoder_matches_reference(pair, grid, vit_impl):
    ref, ours = pair
    grid = torch.tensor(grid)
    g = torch.Generator().manual_seed(0)
    pix = torch.cat([pixels(tuple(x), g) for x in grid.tolist()])
    with torch.no_grad():
        out = ref.model.visual(pix, grid_thw=grid)
        ref_tok, ref_ds = out.pooler_output, out.deepstack_features
        tok, ds = ours.visual(pix, grid)
    assert tok.shape == (pix.shape[0] // 4, 64) and len(ds) == len(ref_ds) == 3
    torch.testing.assert_close(tok, ref_tok, rtol=0, atol=1e-5)
    for a, b in zip(ds, ref_ds):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_vision_encoder_gradients_match_reference(pair, vit_impl, flex_backward_on_cpu):
    """Training goes back through the block-diagonal attention (dense batches: rows gathered by frame-group size
    and scattered back; flex: one block-masked call): every ViT and merger gradient equals the reference's, on
    images of several sizes and a video."""
    ref, ours = pair
    grid = torch.tensor(GRIDS[3] + [[1, 4, 6]])
    g = torch.Generator().manual_seed(2)
    pix = torch.cat([pixels(tuple(x), g) for x in grid.tolist()])
    grads = []
    def ref_out():
        out = ref.model.visual(pix, grid_thw=grid)
        return out.pooler_output, out.deepstack_features

    for visual, out in ((ref.model.visual, ref_out), (ours.visual, lambda: ours.visual(pix, grid))):
        tok, ds = out()
        w = torch.randn(tok.shape, generator=torch.Generator().manual_seed(3))
        ((tok * w).sum() + sum((d * w).sum() for d in ds)).backward()
        grads.append({n: p.grad.clone() for n, p in visual.named_parameters()})
        visual.zero_grad(set_to_none=True)
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:      # (the patch embedding's Conv3d gradient is our Linear's, flattened)
        torch.testing.assert_close(grads[1][n], grads[0][n].reshape(grads[1][n].shape), rtol=1e-4, atol=1e-5, msg=n)


def test_vision_encoder_under_bf16_autocast(pair):
    """train.py on a GPU runs the ViT under bf16 autocast (LayerNorm in fp32, attention in bf16): forward and
    backward run on packed images of several sizes and a video, and the tokens stay within bf16 rounding of fp32."""
    _, ours = pair
    grid = torch.tensor(GRIDS[3])
    g = torch.Generator().manual_seed(4)
    pix = torch.cat([pixels(tuple(x), g) for x in grid.tolist()])
    with torch.no_grad():
        ref, _ = ours.visual(pix, grid)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tok, ds = ours.visual(pix, grid)
    (tok.float().sum() + sum(d.float().sum() for d in ds)).backward()
    ours.visual.zero_grad(set_to_none=True)
    assert tok.dtype == torch.bfloat16
    torch.testing.assert_close(tok.float(), ref, rtol=0, atol=0.05 * ref.abs().max().item())


def test_frame_groups_do_not_attend_to_each_other(pair, vit_impl):
    """Changing the pixels of one image (or one frame group) leaves every other one's features unchanged."""
    _, ours = pair
    grid = torch.tensor([[2, 4, 4], [1, 4, 4]])
    g = torch.Generator().manual_seed(1)
    pix = torch.randn(int(grid.prod(-1).sum()), 1536, generator=g)
    pix2 = pix.clone()
    pix2[:16] += 1.0                                     # first frame group of the video only
    with torch.no_grad():
        a, _ = ours.visual(pix, grid)
        b, _ = ours.visual(pix2, grid)
    assert not torch.allclose(a[:4], b[:4])
    torch.testing.assert_close(a[4:], b[4:], rtol=0, atol=0)


def first_block_inputs(visual, pix, grid):
    """The positional and keyword inputs of the reference ViT's first block (a PyTorch forward pre-hook)."""
    seen = {}

    def hook(module, args, kwargs):
        seen.update(args=args, kwargs=kwargs)
    handle = visual.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            visual(pix, grid_thw=grid)
    finally:
        handle.remove()
    return seen["args"], seen["kwargs"]


@pytest.mark.parametrize("hw", [(2, 2), (4, 6), (46, 50), (48, 48), (100, 36), (2, 400)])
def test_position_embedding_interpolation_matches_reference(pair, hw):
    """The reference's resampled position table is what its first block receives once the patch embedding
    outputs zeros."""
    ref, ours = pair
    grid = torch.tensor([[1, *hw]])                      # grids are even: the processor makes multiples of 2x2
    N = hw[0] * hw[1]
    visual = copy.deepcopy(ref.model.visual)
    with torch.no_grad():
        for p in visual.patch_embed.parameters():
            p.zero_()
    (ref_pe, *_), _ = first_block_inputs(visual, torch.randn(N, 1536), grid)
    img, row, col, _ = patch_coordinates(grid, N, 2)
    with torch.no_grad():
        ours_pe = ours.visual.interpolated_pos_embed(img, row, col, grid)
    assert ref_pe.abs().max() > 1e-2
    torch.testing.assert_close(ours_pe, ref_pe, rtol=0, atol=1e-6)


def test_patch_embed_is_the_checkpoint_conv3d(pair):
    """Conv3d with kernel = stride = input is a Linear over the flattened patch. The two kernels sum the 1536
    products in different orders, so they agree to fp32 rounding (measured ~6e-6 on outputs of size ~2)."""
    ref, ours = pair
    x = torch.randn(10, 1536)
    with torch.no_grad():
        torch.testing.assert_close(ours.visual.patch_embed.proj(x), ref.model.visual.patch_embed(x), rtol=0, atol=1e-5)


def test_patch_coordinates_merge_block_order():
    """Rows of a 4x4 grid in merge-block order: each run of 4 is one 2x2 block, row-major inside it."""
    _, row, col, _ = patch_coordinates(torch.tensor([[1, 4, 4]]), 16, 2)
    assert row.tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]
    assert col.tolist() == [0, 1, 0, 1, 2, 3, 2, 3, 0, 1, 0, 1, 2, 3, 2, 3]
