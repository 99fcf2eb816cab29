"""
Qwen3-ViT: the vision encoder of Qwen3-VL (Qwen3-VL Technical Report §2; reference §2).

Notable features
- Patch embedding of 2 frames x 16 x 16 pixels x 3 channels, written as one Linear over the flattened patch
  (it is the Conv3d of the checkpoint with kernel = stride = input; the loader reshapes that weight).
- A learned 48 x 48 absolute position embedding, resampled bilinearly (align-corners) to each image's patch grid.
- 2-D rotary attention (rope.vision_cos_sin) over all images and video frame groups of a batch packed into one
  sequence; attention is block-diagonal: each frame group of each image/video attends only to itself. It is
  computed as one batched attention per distinct frame-group size, not as one [N, N] masked product: the encoder
  sorts the rows once so that frame groups of one size sit side by side (blocks work row by row, so the order does
  not matter to them) and puts them back before the mergers. No work on the zeros of the mask, no padding.
  In training on CUDA (`attn_impl`) it is instead one FlexAttention call over the packed rows with a block mask of their
  segment ids (flex.py): no sort, no loop over sizes.
- Pre-norm blocks (LayerNorm, non-causal attention, GELU-tanh MLP), no final norm.
- A 2x2 spatial-merge MLP ("merger") into the LLM width, and the DeepStack mergers that turn the outputs of
  a few intermediate blocks into extra features for the first LLM layers (§2.2).

Input layout (as the processor makes it): `pixel_values` [N, 3*2*16*16] with each row ordered (c, t, py, px),
rows in merge-block order (for each frame group: rows of 2x2 blocks, row-major inside a block);
`grid_thw` [n, 3] = (t, h, w) in patches per image/video. There is no Python loop over images; the dense-batch
path reads the frame-group sizes back to the host once (to shape the batched attention) and loops over the
distinct sizes.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import flex
from rope import apply_rotary, vision_cos_sin


def patch_coordinates(grid_thw, num_patches, merge_size):
    """
    For every patch row of the packed `pixel_values`, where it sits: its image, (row, col) in the image's patch
    grid, and its attention segment (one segment per frame group of each image/video).
    grid_thw: [n, 3] long; num_patches: N = sum(t*h*w), known from pixel_values.shape (no sync).
    Returns img [N], row [N], col [N], segment [N] (long).
    """
    device = grid_thw.device
    t, h, w = grid_thw.unbind(-1)                                          # [n] each
    per_img = t * h * w                                                    # [n]
    img = torch.repeat_interleave(torch.arange(len(grid_thw), device=device), per_img,
                                  output_size=num_patches)                # [N]
    offset = torch.arange(num_patches, device=device) - (per_img.cumsum(0) - per_img)[img]
    hi, wi = h[img], w[img]                                                # [N]
    frame, in_frame = offset // (hi * wi), offset % (hi * wi)              # frame group, index inside it
    m = merge_size
    block, in_block = in_frame // (m * m), in_frame % (m * m)             # 2x2 block index, position inside
    row = (block // (wi // m)) * m + in_block // m
    col = (block % (wi // m)) * m + in_block % m
    segment = (t.cumsum(0) - t)[img] + frame                               # global frame-group index
    return img, row, col, segment


def segment_batches(grid_thw, segment):
    """
    How to run block-diagonal attention as dense batches: `order` [N] lists the packed rows sorted (stably) by the
    size of their frame group, so all groups of one size are contiguous and each stays in its own order; `sizes`
    is [(count, length), ...] per distinct size, ascending, on the host (the one read-back of the forward).
    x[order][:count * length].view(count, length, ...) is then the first batch, and so on.
    """
    lengths = (grid_thw[:, 1] * grid_thw[:, 2]).repeat_interleave(grid_thw[:, 0])   # [frame groups]
    order = torch.sort(lengths[segment], stable=True).indices                      # [N]
    values, counts = torch.unique(lengths, return_counts=True)                     # ascending sizes
    sizes = list(zip(*torch.stack([counts, values]).tolist()))
    return order, sizes


class VisionAttention(nn.Module):
    """Non-causal multi-head attention with 2-D RoPE; qkv rows are [q | k | v], head-major (reference §2.4)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x, cos, sin, layout):
        """
        x [N, D]; layout: a flex.BlockMask of the frame groups (rows in packed order) or, for dense batches,
        [(count, length), ...] with the rows grouped by frame-group size (segment_batches). Returns [N, D].
        """
        N, D = x.shape
        q, k, v = self.qkv(x).view(N, 3, self.num_heads, D // self.num_heads).unbind(1)   # [N, nh, hd] each
        q = apply_rotary(q, cos[:, None], sin[:, None])                # rotated in float32
        k = apply_rotary(k, cos[:, None], sin[:, None])
        if isinstance(layout, flex.BlockMask):   # every frame group in one call: a block mask of their segments
            y = flex.attention(*(z.transpose(0, 1)[None] for z in (q, k, v)), layout)       # [1, nh, N, hd]
            return self.proj(y[0].transpose(0, 1).reshape(N, D))                           # [N, D]
        # a patch attends only to patches of its own frame group: one dense batch per frame-group size
        ys, start = [], 0
        for count, length in layout:
            batch = [z[start:start + count * length].view(count, length, self.num_heads, -1).transpose(1, 2)
                     for z in (q, k, v)]                               # [count, nh, length, hd]
            ys.append(F.scaled_dot_product_attention(*batch).transpose(1, 2).reshape(count * length, D))
            start += count * length
        return self.proj(torch.cat(ys))                                # [N, D], same row order as x


class VisionMLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.linear_fc1 = nn.Linear(dim, hidden, bias=True)
        self.linear_fc2 = nn.Linear(hidden, dim, bias=True)

    def forward(self, x):
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate="tanh"))


class VisionBlock(nn.Module):
    """Pre-norm ViT block: x + Attn(LN(x)), then x + MLP(LN(x)). LayerNorm eps 1e-6, with bias."""

    def __init__(self, cfg):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.attn = VisionAttention(cfg.hidden_size, cfg.num_heads)
        self.mlp = VisionMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, layout):
        x = x + self.attn(self.norm1(x), cos, sin, layout)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """
    2x2 spatial merge (reference §2.5): four consecutive patch rows (one 2x2 block) become one LLM token,
    out = fc2(GELU(fc1(concat))), with exact-erf GELU. The main merger normalises each patch before the
    concatenation (LayerNorm(D)); the DeepStack mergers normalise after it (LayerNorm(4D), `postshuffle`).
    """

    def __init__(self, dim, out_dim, merge_size, postshuffle_norm):
        super().__init__()
        self.merged_dim = dim * merge_size ** 2
        self.postshuffle_norm = postshuffle_norm
        self.norm = nn.LayerNorm(self.merged_dim if postshuffle_norm else dim, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.merged_dim, self.merged_dim, bias=True)
        self.linear_fc2 = nn.Linear(self.merged_dim, out_dim, bias=True)

    def forward(self, x):                                               # x [N, D]
        if self.postshuffle_norm:
            x = self.norm(x.view(-1, self.merged_dim))                  # [N/4, 4D]
        else:
            x = self.norm(x).view(-1, self.merged_dim)                  # [N/4, 4D]
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))              # [N/4, out_dim]


class VisionEncoder(nn.Module):
    """Qwen3-ViT + merger + DeepStack mergers. forward(pixel_values, grid_thw) -> (tokens, deepstack list)."""

    def __init__(self, cfg, deepstack=True):
        """cfg: a VisionConfig; deepstack=False (the model's ablation switch) builds no DeepStack mergers, and forward
        returns an empty DeepStack list."""
        super().__init__()
        self.cfg = cfg
        # block-diagonal attention over the frame groups: "sdpa" (one dense batch per frame-group size), "flex"
        # (FlexAttention, all of them in one call with a block mask of their segment ids) or "auto": flex when
        # training on CUDA (with gradients; inference keeps sdpa, which needs no compilation before its first call)
        self.attn_impl = "auto"
        patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2     # 1536
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Linear(patch_dim, cfg.hidden_size, bias=True)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.grid_side = int(cfg.num_position_embeddings ** 0.5)                        # 48
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg.hidden_size, cfg.out_hidden_size, cfg.spatial_merge_size, False)
        self.deepstack_indexes = list(cfg.deepstack_visual_indexes) if deepstack else []   # blocks that feed the LLM
        self.deepstack_merger_list = nn.ModuleList(
            PatchMerger(cfg.hidden_size, cfg.out_hidden_size, cfg.spatial_merge_size, True)
            for _ in self.deepstack_indexes)

    def interpolated_pos_embed(self, img, row, col, grid_thw):
        """
        Bilinear, align-corners resampling of the G x G table to each image's (h, w) patch grid (reference §2.2):
        patch (r, c) of an h x w grid samples the table at y = r*(G-1)/(h-1), x = c*(G-1)/(w-1).
        Weights and the 4-term sum in float32, cast once to the activation dtype. Returns [N, D].
        """
        G = self.grid_side
        h = grid_thw[img, 1].float()
        w = grid_thw[img, 2].float()
        y = row.float() * (G - 1) / (h - 1).clamp(min=1)                # [N] in [0, G-1]
        x = col.float() * (G - 1) / (w - 1).clamp(min=1)
        y0, x0 = y.floor().long(), x.floor().long()
        y1, x1 = (y0 + 1).clamp(max=G - 1), (x0 + 1).clamp(max=G - 1)
        dy, dx = y - y0, x - x0
        idx = torch.stack([y0 * G + x0, y0 * G + x1, y1 * G + x0, y1 * G + x1], dim=1)              # [N, 4]
        wts = torch.stack([(1 - dy) * (1 - dx), (1 - dy) * dx, dy * (1 - dx), dy * dx], dim=1)     # [N, 4]
        return (self.pos_embed(idx).float() * wts[..., None]).sum(1)                                 # [N, D]

    def forward(self, pixel_values, grid_thw):
        """
        pixel_values [N, 1536], grid_thw [n, 3] ->
        tokens [N/4, out_hidden] and a list of len(self.deepstack_indexes) tensors [N/4, out_hidden].
        """
        cfg = self.cfg
        dtype = self.patch_embed.proj.weight.dtype
        N = pixel_values.shape[0]
        img, row, col, segment = patch_coordinates(grid_thw, N, cfg.spatial_merge_size)

        x = self.patch_embed.proj(pixel_values.to(dtype))                              # [N, D]
        x = x + self.interpolated_pos_embed(img, row, col, grid_thw).to(dtype)
        cos, sin = vision_cos_sin(row, col, cfg.hidden_size // cfg.num_heads)          # [N, hd] float32
        impl = self.attn_impl
        if impl not in ("auto", "sdpa", "flex"):
            raise ValueError(f"attn_impl must be 'auto', 'sdpa' or 'flex', not {impl!r}")
        if impl == "flex" or (impl == "auto" and x.is_cuda and torch.is_grad_enabled()):
            # rows stay in packed order; a patch sees the patches of its own segment (frame group)
            layout = flex.block_mask(lambda b, h, q, kv: segment[q] == segment[kv], 1, N, x.device)
            packed = lambda y: y                                                       # noqa: E731
        else:
            # the blocks run on rows grouped by frame-group size; the mergers read them back in packed order
            order, layout = segment_batches(grid_thw, segment)
            inverse = torch.argsort(order)                                             # [N]
            x, cos, sin = x[order], cos[order], sin[order]
            packed = lambda y: y[inverse]                                              # noqa: E731

        deepstack = []
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, layout)
            if i in self.deepstack_indexes:
                j = self.deepstack_indexes.index(i)
                deepstack.append(self.deepstack_merger_list[j](packed(x)))             # [N/4, out_hidden]
        return self.merger(packed(x)), deepstack                                        # [N/4, out_hidden]
