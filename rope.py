"""
Rotary position embeddings of Qwen3-VL (Qwen3-VL Technical Report, §2.1).

Three pieces live here, in the order the model uses them:

1. `vision_cos_sin`   2-D axial RoPE of the ViT: half of the rotary frequencies turn with the patch row,
                      half with the patch column (no temporal rotation inside the ViT).
2. `rope_index`       3-D (t, h, w) position ids of every LLM token for any mix of text, images and
                      timestamped video frame groups, with left padding, plus the `rope_delta` that decoding
                      continues from. Text advances all three axes together; a visual block of a merged
                      grid (h, w) shares one t and spreads h/w over its rows and columns.
3. `mrope_cos_sin`    Interleaved MRoPE: the 64 frequency slots of a 128-dim head are assigned to the axes as
                      THW THW ... THW TTTT (Qwen3-VL) instead of Qwen2-VL's chunked TTT..HHH..WWW (kept behind
                      `layout="chunked"` for ablations). Pure text has t = h = w, so it reduces to 1-D RoPE.

Ablations (config.ABLATIONS): text.mrope_layout "chunked" (the slot layout above) or "text" (rope_index numbers
every token 1-D, like text); video_time "trope" (rope_index: a video's frame groups advance t with their time in
seconds, Qwen2.5-VL's absolute-time positions).

`rope_frequencies` gives the text RoPE's frequencies, with the context extension of the config (YaRN or linear
position interpolation: TextConfig.rope_scaling), and the factor of cos and sin that mrope_cos_sin applies.
`apply_rotary` rotates q/k with the usual rotate-half pairing (dim i with dim i + d/2).

Everything is vectorised (no Python loop over samples or images) and has no host synchronisation, so it runs
inside a compiled forward. Angles are always computed in float32 (reference gotchas §7.6/7.7: bf16 angles
lose exactness past position 256).
"""
import math

import torch


def rotate_half(x):
    """[..., d] -> [..., d]: (x1, x2) -> (-x2, x1) with x1, x2 the two halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x, cos, sin):
    """Rotate x [..., S, d] by angles whose cos/sin broadcast to it. Computed in cos.dtype, returned in x.dtype."""
    xf = x.to(cos.dtype)
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def inv_freq(dim, theta):
    """The dim/2 rotary frequencies 1 / theta^(2i/dim), float32. [dim/2]"""
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)


def rope_frequencies(dim, theta, scaling=None, max_position_embeddings=None):
    """
    The dim/2 rotary frequencies [dim/2] float32 and the factor that scales cos and sin, for a RoPE scaling of
    TextConfig.rope_scaling (None: plain RoPE, factor 1; its keys: config.ROPE_SCALING_KEYS).

    linear (position interpolation, Chen et al. 2023): every frequency / factor, so position p turns as p / factor.
    yarn (YaRN, Peng et al. 2023, §3.2 "NTK-by-parts" and §3.4): frequency i turns r_i = L / wavelength_i times over
    the original context L (original_max_position_embeddings, default max_position_embeddings). Frequencies that turn
    more than beta_fast times keep their value (extrapolation), those that turn fewer than beta_slow times are
    divided by factor (interpolation), and a linear ramp over the dimension index blends the two in between. The
    ramp's ends are the (fractional) dimensions where r_i = beta_fast and r_i = beta_slow, d(r) = dim ln(L / (2 pi r))
    / (2 ln theta), rounded outwards when truncate (default True) and clipped to [0, dim - 1]. cos and sin are scaled
    by attention_factor, by default the temperature sqrt(1/t) = 0.1 ln(factor) + 1, or with mscale and
    mscale_all_dim both set (DeepSeek's form) m(factor, mscale) / m(factor, mscale_all_dim), m(s, a) = 0.1 a ln s + 1.
    """
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        return inv_freq(dim, theta), 1.0
    factor = scaling["factor"]
    if rope_type == "linear":
        return inv_freq(dim, theta) / factor, 1.0
    if rope_type != "yarn":
        raise ValueError(f"rope_type {rope_type!r} is not implemented; supported: default, linear, yarn")
    original = scaling.get("original_max_position_embeddings", max_position_embeddings)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def m(a):
        return 0.1 * a * math.log(factor) + 1.0 if factor > 1 else 1.0
    attention = scaling.get("attention_factor")
    if attention is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention = m(mscale) / m(mscale_all_dim) if mscale and mscale_all_dim else m(1)

    def dim_of(rotations):                       # the dimension index whose frequency turns `rotations` times over L
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))
    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low if high != low else 0.001)).clamp(0, 1)
    keep = 1 - ramp                                                               # [dim/2] weight of the original
    power = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)         # [dim/2] theta^(2i/dim)
    return 1.0 / (factor * power) * (1 - keep) + 1.0 / power * keep, float(attention)    # [dim/2]


# ----------------------------------------------------------------------------------------------------------
# 1. Vision 2-D RoPE (reference §2.3)

def vision_cos_sin(rows, cols, head_dim, theta=10000.0):
    """
    rows, cols: [N] patch row / column inside its image (same for every frame of a video).
    Returns cos, sin: [N, head_dim] float32. The first quarter of the frequencies turns with the row and the
    second quarter with the column; the angle vector is then duplicated for the rotate-half pairing.
    """
    freqs = inv_freq(head_dim // 2, theta).to(rows.device)                 # [head_dim/4]
    angles = torch.cat([rows[:, None].float() * freqs,
                        cols[:, None].float() * freqs], dim=-1)            # [N, head_dim/2]
    emb = torch.cat([angles, angles], dim=-1)                              # [N, head_dim]
    return emb.cos(), emb.sin()


# ----------------------------------------------------------------------------------------------------------
# 2. 3-D position ids (reference §3.5)

TROPE_TOKENS_PER_SECOND = 2      # video_time "trope": temporal positions per second of video (Qwen2.5-VL's value)


def rope_index(input_ids, attention_mask, image_grid_thw, video_grid_thw, *,
               image_token_id, video_token_id, spatial_merge_size=2, text_positions=False, video_second_per_grid=None):
    """
    input_ids:      [B, S] token ids (left padded)
    attention_mask: [B, S] 1 for real tokens, 0 for padding (or None)
    image_grid_thw: [n_images, 3] (t, h, w) in patches, in order of appearance (or None)
    video_grid_thw: [n_videos, 3] likewise; each video is a run of t frame groups, each group its own
                    `<|vision_start|><|video_pad|>...<|vision_end|>` block after a text timestamp
    text_positions: the "text" layout (config text.mrope_layout): every real token one 1-D position, visual tokens
                    numbered like text, all three rows equal
    video_second_per_grid: [n_videos] float, the seconds between two frame groups of each video (video_time
                    "trope", Qwen2.5-VL's second_per_grid_ts): then each video is ONE block of all its t groups, and
                    group g sits at t = start + floor(g * seconds * TROPE_TOKENS_PER_SECOND)
    Returns position_ids [3, B, S] (rows t, h, w; padding gets 1 as in the reference) and
    rope_deltas [B, 1] = max position + 1 - S, so that decode step k (0-based, after the S prompt tokens)
    sits at position S + k + rope_delta on all three axes.

    How it works, without a loop: every real token "advances" the running position. A text token advances it
    by 1; a visual block of merged grid (t', h', w') advances it by 1 + its largest offset on any axis (max(h', w')
    for one frame group), charged to its first token. The exclusive prefix sum of the advances is each token's
    start position `st`. A text token sits at (st, st, st); the k-th token of a visual block that starts at `st0`
    sits at (st0 + time offset of its group, st0 + row, st0 + column).
    """
    B, S = input_ids.shape
    device = input_ids.device
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if text_positions:
        pos = valid.long().cumsum(dim=1) - 1                                    # [B, S]
        pos = torch.where(valid, pos, torch.ones_like(pos))[None].expand(3, B, S)   # [3, B, S]
        return pos, valid.sum(dim=1, keepdim=True) - S       # the largest position + 1 is the count of real tokens

    # per block: merged grid (t', h', w') and seconds per frame group; images and videos listed separately in
    # order of appearance. A block is one frame group, or (trope) a whole video.
    m = spatial_merge_size
    def blocks(grid, seconds):                             # grid [n, 3] -> [n_blocks, 3] long, [n_blocks] float
        if grid is None or grid.numel() == 0:
            return torch.zeros(0, 3, dtype=torch.long, device=device), torch.zeros(0, device=device)
        grid = grid.to(device)
        if seconds is not None:                            # trope: the video whole, its groups spaced in time
            return grid // torch.tensor([1, m, m], device=device), seconds.to(device, torch.float32)
        groups = grid.repeat_interleave(grid[:, 0], dim=0)  # split into frame groups (t -> 1)
        groups = torch.cat([torch.ones_like(groups[:, :1]), groups[:, 1:] // m], dim=1)
        return groups, torch.zeros(len(groups), device=device)
    img_blk, img_sec = blocks(image_grid_thw, None)
    vid_blk, vid_sec = blocks(video_grid_thw, video_second_per_grid)

    is_img = (input_ids == image_token_id) & valid           # [B, S]
    is_vid = (input_ids == video_token_id) & valid
    is_vis = is_img | is_vid
    # a block starts where a visual token follows a token that is not of the same kind
    prev_img = torch.nn.functional.pad(is_img, (1, 0))[:, :-1]
    prev_vid = torch.nn.functional.pad(is_vid, (1, 0))[:, :-1]
    img_start = is_img & ~prev_img                           # [B, S]
    vid_start = is_vid & ~prev_vid
    # index of each token's block among all image (video) blocks of the batch, row-major = order of appearance
    img_block = (img_start.flatten().cumsum(0) - 1).view(B, S).clamp(min=0)
    vid_block = (vid_start.flatten().cumsum(0) - 1).view(B, S).clamp(min=0)
    zero = torch.zeros(B, S, 3, dtype=torch.long, device=device)
    thw = torch.where(is_img[..., None], img_blk[img_block] if len(img_blk) else zero, zero)
    thw = torch.where(is_vid[..., None], vid_blk[vid_block] if len(vid_blk) else zero, thw)   # [B, S, 3]
    zero_sec = torch.zeros(B, S, device=device)
    sec = torch.where(is_vid, vid_sec[vid_block] if len(vid_sec) else zero_sec, zero_sec)     # [B, S] (images: 0)
    h, w = thw[..., 1].clamp(min=1), thw[..., 2].clamp(min=1)

    # offset k of each visual token inside its block: index minus the index of the block's first token
    idx = torch.arange(S, device=device).expand(B, S)
    start_idx = torch.where(img_start | vid_start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    k = idx - start_idx                                      # [B, S], meaningful on visual tokens
    group, in_group = k // (h * w), k % (h * w)              # frame group inside the block, token inside the group
    # the time offset of a frame group, truncated to a whole position as Qwen2.5-VL does: g x (rate x seconds)
    interval = sec * TROPE_TOKENS_PER_SECOND                                                 # [B, S] float32
    t_off = (group.float() * interval).long()                                                # [B, S]
    last_t_off = ((thw[..., 0] - 1).clamp(min=0).float() * interval).long()

    advance = torch.where(is_vis, torch.zeros_like(idx), valid.long())
    span = torch.maximum(last_t_off, torch.maximum(thw[..., 1], thw[..., 2]) - 1) + 1     # [B, S]
    advance = torch.where(img_start | vid_start, span, advance)
    st = advance.cumsum(dim=1) - advance                     # exclusive prefix sum: start position of each token
    # every visual token of a block shares the start of its first token: carry it forward with cummax
    st0 = torch.where(img_start | vid_start, st, torch.zeros_like(st)).cummax(dim=1).values

    t_pos = torch.where(is_vis, st0 + t_off, st)
    h_pos = torch.where(is_vis, st0 + in_group // w, st)
    w_pos = torch.where(is_vis, st0 + in_group % w, st)
    pos = torch.stack([t_pos, h_pos, w_pos])                 # [3, B, S]
    pos = torch.where(valid[None], pos, torch.ones_like(pos))

    max_pos = torch.where(valid[None], pos, torch.zeros_like(pos)).amax(dim=(0, 2))    # [B]
    rope_deltas = (max_pos + 1 - S)[:, None]                 # [B, 1]
    return pos, rope_deltas


# ----------------------------------------------------------------------------------------------------------
# 3. Interleaved MRoPE (reference §3.4)

def mrope_cos_sin(position_ids, frequencies, mrope_section=(24, 20, 20), layout="interleaved"):
    """
    position_ids: [3, B, S] (t, h, w) positions, or [B, S] for plain 1-D positions.
    frequencies: rope_frequencies(head_dim, ...), the frequencies [head_dim/2] and the factor of cos and sin.
    Returns cos, sin: [B, S, head_dim] float32.
    layout (config text.mrope_layout), which axis each frequency slot i turns with:
    "interleaved" (Qwen3-VL): h if i % 3 == 1 and i < 3*sections[1], w if i % 3 == 2 and i < 3*sections[2], else t.
    "chunked" (Qwen2-VL, Qwen2.5-VL): the first sections[0] slots t, the next sections[1] h, the last sections[2] w.
    "text": t for every slot, 1-D RoPE (rope_index gives such a model equal rows anyway).
    """
    if position_ids.dim() == 2:
        position_ids = position_ids[None].expand(3, -1, -1)
    freqs, scale = frequencies[0].to(position_ids.device), frequencies[1]     # [head_dim/2]
    head_dim = 2 * len(freqs)
    angles = position_ids[..., None].float() * freqs                            # [3, B, S, head_dim/2]
    slot = torch.arange(head_dim // 2, device=position_ids.device)
    if layout == "interleaved":
        axis = torch.where((slot % 3 == 1) & (slot < 3 * mrope_section[1]), 1, 0)
        axis = torch.where((slot % 3 == 2) & (slot < 3 * mrope_section[2]), 2, axis)
    elif layout == "chunked":
        axis = torch.repeat_interleave(torch.arange(3, device=slot.device), torch.tensor(mrope_section, device=slot.device))
    elif layout == "text":
        axis = torch.zeros_like(slot)
    else:
        raise ValueError(f"layout={layout!r}: must be 'interleaved', 'chunked' or 'text'")
    angles = angles.gather(0, axis.view(1, 1, 1, -1).expand(1, *angles.shape[1:]))[0]  # [B, S, head_dim/2]
    emb = torch.cat([angles, angles], dim=-1)                                   # [B, S, head_dim]
    return emb.cos() * scale, emb.sin() * scale                                 # scale 1 leaves them exact
