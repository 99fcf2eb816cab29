"""
Qwen3-VL: the language model, the multimodal glue and its checkpoints (Qwen3-VL Technical Report §2); the config,
its presets and the Hugging Face file formats are in config.py.

Notable features
- Qwen3 decoder: RMSNorm pre-norm blocks, grouped-query attention with QK-norm (an RMSNorm over each head's
  128 dims of q and k, before RoPE), SwiGLU MLP, no biases anywhere, untied or tied LM head.
- Interleaved MRoPE (rope.py): every token carries a 3-D (t, h, w) position; text advances all three.
- Visual tokens: the ViT's merged features replace the `<|image_pad|>` / `<|video_pad|>` placeholder embeddings.
- DeepStack (§2.2): features of intermediate ViT blocks are added to the hidden states at visual positions
  after each of the first LLM layers.
- Ablation switches (config.ABLATIONS): `deepstack`, `text.mrope_layout`, `video_time`; the paper's by default.
- Hugging Face safetensors checkpoints of both generations (transformers 4.57 and 5, dense and MoE) load and save
  through config.py's key table (`HF_PREFIXES`), with the tokenizer and processor files when asked
  (`save_pretrained`); a checkpoint reads only the files inside its directory and only float tensors.

Forward pass flow (Qwen3VL.forward)
    check_inputs: shapes always; on a prompt ids in range, grids against pixel rows and placeholders, finite pixels
    input_ids ──embed_tokens──> x [B, S, H]
    pixel_values ──VisionEncoder──> tokens [N/4, H], deepstack [3 x [N/4, H]]
        tokens scattered into x at placeholder positions; deepstack scattered into zero tensors [B, S, H]
    rope_index(input_ids, grids) ──> 3-D positions [3, B, S] ──mrope_cos_sin──> cos, sin
    attention mask: dense [B, 1, S, K] (SDPA), or for packed training rows on the GPU a block mask (FlexAttention)
    context parallelism (train.py --cp): each rank keeps its positions of x, deepstack, cos, sin and the targets
    for layer l: x = DecoderLayer_l(x);  if l < 3: x = x + deepstack[l]
    logits = lm_head(norm(x))  [B, S, V] (or norm(x) itself: return_hidden);  loss = cross-entropy of next-token
        labels (optional), head and cross-entropy chunk by chunk (chunked_cross_entropy)
"""
import math
import os
import zlib
from collections import Counter

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import flex
from config import (HF_EXPERT_LAYOUT, HF_FORMATS, PATCH_EMBED, Qwen3VLConfig, TextConfig, atomic_write, checkpoint_files,
                    hf_to_ours, ours_to_hf, read_hf_config, write_json)
from moe import (EXPERT_LAYOUTS, SparseMoeBlock, expert_layout_of, experts_from_checkpoint, experts_to_checkpoint,
                 is_moe_layer, load_balancing_loss)
from rope import apply_rotary, mrope_cos_sin, rope_frequencies, rope_index
from vision import VisionEncoder

# ----------------------------------------------------------------------------------------------------------
# The Qwen3 decoder (reference §3.2)


class RMSNorm(nn.Module):
    """w * (x / rms(x)): normalised in float32, cast back to the input dtype, then scaled by the weight."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    """Grouped-query causal attention with QK-norm and MRoPE; n_kv heads are shared by n_heads/n_kv q heads."""

    def __init__(self, cfg: TextConfig, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)    # one weight shared by all heads
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.register_buffer("qkv_weight", None, persistent=False)  # set by fuse_projections (decoding)
        self.flex = flex.Attention()                                # FlexAttention as a module (context parallelism)

    def forward(self, x, cos, sin, mask, kv_cache=None, prompt=False):
        """x [B, S, H]; mask: None (causal), a bool [B or 1, 1, S, K] (True = attend; SDPA) or a flex.BlockMask
        (FlexAttention, no cache). With a kv_cache the new keys are written into it; a decode step attends over the
        whole cache (K = max_len), the prompt (`prompt=True`: the first call, on an empty cache) only over its own S
        keys, so that its attention runs the causal kernels. Returns [B, S, H]."""
        B, S, _ = x.shape
        if self.qkv_weight is not None and not torch.is_grad_enabled():  # decoding: one product (fuse_projections)
            q, k, v = F.linear(x, self.qkv_weight).split([self.q_proj.out_features, self.k_proj.out_features,
                                                          self.v_proj.out_features], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = self.q_norm(q.view(B, S, self.n_heads, self.head_dim)).transpose(1, 2)   # [B, nh, S, hd]
        k = self.k_norm(k.view(B, S, self.n_kv, self.head_dim)).transpose(1, 2)      # [B, nkv, S, hd]
        v = v.view(B, S, self.n_kv, self.head_dim).transpose(1, 2)                   # [B, nkv, S, hd]
        cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)   # rotated in the activation dtype
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is not None:
            cached = kv_cache.update(self.layer_idx, k, v)              # [B, nkv, max_len, hd] each
            if not prompt:
                k, v = cached
        if isinstance(mask, flex.BlockMask):  # packed rows on the GPU: only the blocks of keys the mask keeps
            # q, k in v's dtype: q_norm's fp32 weight promotes them under autocast (SDPA casts likewise)
            y = self.flex(q.to(v.dtype), k.to(v.dtype), v, mask)                            # [B, nh, S, hd]
            return self.o_proj(y.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))
        gqa = self.n_kv != self.n_heads
        if gqa and mask is not None and S > 1:  # the fused kernels that take a mask do not take grouped kv heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)   # each kv head serves n_heads/n_kv q heads
            v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)   # [B, nh, K, hd]
            gqa = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=gqa)                                    # [B, nh, S, hd]
        return self.o_proj(y.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.register_buffer("gate_up_weight", None, persistent=False)  # set by fuse_projections (decoding)

    def forward(self, x):
        if self.gate_up_weight is not None and not torch.is_grad_enabled():  # decoding: one product (fuse_projections)
            gate, up = F.linear(x, self.gate_up_weight).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # Qwen3-VL-MoE (moe.py): routed experts in the layers the config makes sparse, a dense MLP elsewhere
        self.mlp = SparseMoeBlock(cfg) if is_moe_layer(cfg, layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, mask, kv_cache=None, prompt=False):
        """Returns x [B, S, H] and the router logits [B*S, E] of a sparse layer (None for a dense one)."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache, prompt)
        if isinstance(self.mlp, SparseMoeBlock):
            y, router_logits = self.mlp(self.post_attention_layernorm(x))
            return x + y, router_logits
        return x + self.mlp(self.post_attention_layernorm(x)), None


class TextModel(nn.Module):
    """Embedding, decoder layers and final norm (the checkpoint's `model.language_model`)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class KVCache:
    """
    Preallocated keys and values for generation: k, v lists with one [B, n_kv, max_len, head_dim] tensor per layer
    (separate tensors, not views of one: a compiled step then writes each in place instead of copying it).
    Every shape is fixed and the write position lives on the device, so a decode step has static shapes, never
    reads a value back to the host, and can be compiled and captured in a CUDA graph (sample.py):
    - `pos` [] long: the slots already written. `update` writes the S new keys at slots pos .. pos+S-1 and returns
      the whole buffer; attention masks the slots not yet written (they lie in the future); the forward then
      advances `pos` in place.
    - `rope_deltas` [B, 1] is set by the prefill (the first call on the cache, rope.rope_index) and belongs to this
      request only, so decoding never reuses another batch's deltas (reference §7.3).
    """

    def __init__(self, cfg: TextConfig, batch_size, max_len, device=None, dtype=torch.float32):
        shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        self.max_len, self.rope_deltas = max_len, None

    def update(self, layer, k, v):
        """k, v [B, n_kv, S, hd] written at slots pos .. pos+S-1; returns the layer's k, v [B, n_kv, max_len, hd]."""
        if self.k[layer].dtype != k.dtype:     # the prefill's activations set the dtypes (autocast, FSDP bf16)
            self.k[layer] = self.k[layer].to(k.dtype)
        if self.v[layer].dtype != v.dtype:
            self.v[layer] = self.v[layer].to(v.dtype)
        slots = self.pos + torch.arange(k.shape[2], device=k.device)                      # [S]
        self.k[layer].index_copy_(2, slots, k)
        self.v[layer].index_copy_(2, slots, v)
        return self.k[layer], self.v[layer]


# ----------------------------------------------------------------------------------------------------------
# Packed attention mask and the chunked loss


def packed_block_mask(document_ids, attention_mask, S, device):
    """
    The decoder's mask as a flex.BlockMask, with the dense mask's rule (Qwen3VL.forward): key j is seen by query i
    when j <= i, j is not padding (attention_mask) or is i itself, and both are in one document (document_ids).
    document_ids [B, S] and attention_mask [B, S] are each optional; without either the mask is causal.
    """
    rows = document_ids if document_ids is not None else attention_mask
    B = 1 if rows is None else rows.shape[0]                                               # 1: the same for every row
    real = None if attention_mask is None else attention_mask.bool()                       # [B, S]

    def mask_mod(b, h, q, kv):
        keep = kv <= q
        if real is not None:
            keep = keep & (real[b, kv] | (kv == q))
        if document_ids is not None:
            keep = keep & (document_ids[b, q] == document_ids[b, kv])
        return keep

    return flex.block_mask(mask_mod, B, S, device)


def chunked_cross_entropy(hidden, weight, targets, weights=None, reduction="mean", chunk_size=1024,
                          ignore_index=-100):
    """
    Cross-entropy of the head F.linear(hidden, weight) against targets, computed `chunk_size` tokens at a time.
    Each chunk's logits (float32, [chunk_size, V]) exist only inside a checkpointed function: the forward keeps
    nothing of them and the backward recomputes them chunk by chunk, so the [tokens, V] logits never exist at once.
    hidden [..., H] (any dtype; under autocast the head runs in its dtype, the softmax in float32), weight [V, H],
    targets [...] long (ignore_index: no loss), weights [...] float or None: each target's factor.
    reduction "sum": sum of weight x cross-entropy over the targets; "mean": that sum over the number of targets
    (not ignored), as F.cross_entropy(reduction="mean") when there are no weights. Returns a float32 scalar.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
    hidden = hidden.reshape(-1, hidden.shape[-1])                                          # [T, H]
    targets = targets.reshape(-1)                                                          # [T]
    weights = None if weights is None else weights.reshape(-1)                             # [T]
    total = torch.zeros((), device=hidden.device, dtype=torch.float32)
    for i in range(0, hidden.shape[0], chunk_size):
        part = slice(i, i + chunk_size)
        total = total + checkpoint(
            _chunk_cross_entropy, hidden[part], weight, targets[part], None if weights is None else weights[part],
            ignore_index, use_reentrant=False)
    return total / (targets != ignore_index).sum() if reduction == "mean" else total


def _chunk_cross_entropy(hidden, weight, targets, weights, ignore_index):
    """hidden [n, H], weight [V, H], targets [n], weights [n] or None -> the (weighted) sum of cross-entropies []."""
    logits = F.linear(hidden, weight).float()                                              # [n, V]
    ce = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")     # [n], 0 where ignored
    return (ce if weights is None else ce * weights).sum()


# ----------------------------------------------------------------------------------------------------------
# The vision-language model

INDEX_DTYPES = (torch.int64, torch.int32)            # what nn.Embedding and the index ops take
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_tensor(name, t, shape, allowed, dtypes):
    """TypeError unless `t` is a tensor of one of `dtypes` (None: any); ValueError '<name> of shape [..]: must be
    <allowed>' unless its shape matches `shape` (None: any shape; a None size: any size)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}={type(t).__name__}: must be a torch.Tensor")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} of dtype {t.dtype}: must be one of {', '.join(map(str, dtypes))}")
    if shape is not None and (t.dim() != len(shape) or any(n is not None and n != size
                                                          for n, size in zip(shape, t.shape))):
        raise ValueError(f"{name} of shape {list(t.shape)}: must be {allowed}")


def prompt_positions(cfg: Qwen3VLConfig, input_ids, attention_mask=None, image_grid_thw=None, video_grid_thw=None,
                 video_second_per_grid=None):
    """3-D positions [3, B, S] and rope_deltas [B, 1] of prompts for a model of config `cfg` (rope.rope_index), with
    its switches: text.mrope_layout "text" numbers every token 1-D; video_time "trope" places a video's frame groups
    by video_second_per_grid [n_videos] (the processor's), which the other settings do not read."""
    return rope_index(input_ids, attention_mask, image_grid_thw, video_grid_thw,
                      image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
                      spatial_merge_size=cfg.vision.spatial_merge_size, text_positions=cfg.text.mrope_layout == "text",
                      video_second_per_grid=video_second_per_grid if cfg.video_time == "trope" else None)


class Qwen3VL(nn.Module):
    def __init__(self, cfg: Qwen3VLConfig):
        super().__init__()
        cfg.validate()                                    # again: the fields may have been changed since construction
        self.cfg = cfg
        # attention of the decoder: "sdpa" (a dense [B, 1, S, K] mask when one is needed), "flex" (FlexAttention with a
        # block mask: packed rows without the O(S^2) mask, no KV cache) or "auto": flex on CUDA for packed rows
        # (document_ids), sdpa otherwise. The ViT has its own switch, self.visual.attn_impl.
        self.attn_impl = "auto"
        self.visual = VisionEncoder(cfg.vision, deepstack=cfg.deepstack)
        self.language_model = TextModel(cfg.text)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, seed=0, std=0.02):
        """Initialisation for training from scratch (as the reference's `_init_weights`): every Linear and
        Embedding weight ~ N(0, 0.02), biases 0, norm weights 1. See `initial_value`."""
        for name, p in self.named_parameters():
            p.copy_(self.initial_value(name, p.shape, seed, std))

    @staticmethod
    def initial_value(name, shape, seed=0, std=0.02):
        """The initial tensor of one parameter, drawn from its own generator seeded by (seed, name): the weights
        depend neither on the device nor on how the model is sharded, so a sharded run (train.py) starts from
        exactly the weights of a single process."""
        if "norm" in name and name.endswith("weight"):
            return torch.ones(shape)
        if name.endswith("bias"):
            return torch.zeros(shape)
        g = torch.Generator().manual_seed(seed * 2**32 + zlib.crc32(name.encode()))
        return torch.randn(shape, generator=g) * std

    @torch.no_grad()
    def fuse_projections(self):
        """
        For decoding on a GPU (sample.py): a decode step reads every weight once for one token per row, so its speed is
        the memory bandwidth its products reach, and one [q+k+v, H] product reads faster than three thin ones (the
        same for gate and up). Each attention's q/k/v and each dense MLP's gate/up weights are copied into one matrix
        and the separate parameters become views into it: names, values, the state dict and memory stay as they were.
        Forward reads the fused matrix under torch.no_grad() and the parameters otherwise, so gradients and optimizer
        steps (RL between rollouts) work as before and update the fused matrix too. Call it after moving the model
        (.to() would copy the parts apart again).
        """
        for m in self.modules():
            if isinstance(m, Attention):
                parts, name = [m.q_proj, m.k_proj, m.v_proj], "qkv_weight"
            elif isinstance(m, MLP):
                parts, name = [m.gate_proj, m.up_proj], "gate_up_weight"
            else:
                continue
            fused = torch.cat([p.weight for p in parts])                  # [sum of out_features, H]
            setattr(m, name, fused)
            for p, w in zip(parts, fused.split([p.out_features for p in parts])):
                p.weight = nn.Parameter(w, requires_grad=p.weight.requires_grad)
        return self

    def num_params(self):
        return sum(p.numel() for p in self.parameters())       # tied weights are counted once

    def num_active_params(self):
        """
        Parameters one token uses: all of them (vision tower, embedding table and LM head included, in full) except
        the experts its router leaves out, E - k per sparse layer. The "A3B" / "A22B" of the MoE names
        (reference §1.4): 3,891,664,112 for 30B-A3B, 22,767,151,856 for 235B-A22B. Equals num_params() when dense.
        """
        idle = 0
        for layer in self.language_model.layers:
            if isinstance(layer.mlp, SparseMoeBlock):
                m = layer.mlp
                per_expert = (m.experts.gate_up_proj.numel() + m.experts.down_proj.numel()) // m.num_experts
                idle += (m.num_experts - m.top_k) * per_expert
        return self.num_params() - idle

    def get_position_ids(self, input_ids, attention_mask=None, image_grid_thw=None, video_grid_thw=None,
                         video_second_per_grid=None):
        """3-D positions [3, B, S] and rope_deltas [B, 1] of a prompt (prompt_positions)."""
        return prompt_positions(self.cfg, input_ids, attention_mask, image_grid_thw, video_grid_thw, video_second_per_grid)

    def check_inputs(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                     pixel_values_videos=None, video_grid_thw=None, labels=None, position_ids=None, kv_cache=None,
                     document_ids=None, loss_weights=None, check_values=True, check_finite=True,
                     video_second_per_grid=None):
        """
        The one check of forward's inputs, made before any work: TypeError for what is not a tensor of the right
        kind, ValueError '<argument> ...: <what is allowed>' for the rest.
        Shapes, dtypes and devices, on every call (metadata only: a decode step captured in a CUDA graph runs them
        at trace time and they never read the device): input_ids [B, S] int64/int32 with B, S >= 1 and, on a
        prompt, S within the context; attention_mask [B, S] (with a kv_cache [B, S .. max_len]); labels,
        document_ids [B, S] (document_ids not with a cache); loss_weights [B, S] float, with labels; position_ids [3, B, S] or [B, S]; pixel rows
        [N, in_channels * temporal_patch_size * patch_size^2] float, each with its grid [n, 3] integer; a KVCache of
        batch B; with video_time "trope", video_second_per_grid [n_videos] float when the positions are computed here
        (a prompt without position_ids).
        Values, with check_values and on a prompt (not on the decode steps that follow it), read back to the host
        once: ids in [0, vocab_size); labels in [0, vocab_size) or -100; each grid's t, h, w >= 1 with h and w
        multiples of spatial_merge_size and sum(t*h*w) = the pixel rows; the placeholder tokens of a modality
        = its merged features, in sum(t) blocks (no pixels: no placeholders); with check_finite, every pixel finite
        (one isfinite pass: a NaN pixel would turn every logit of its row into NaN).
        """
        cfg, v = self.cfg.text, self.cfg.vision
        _check_tensor("input_ids", input_ids, (None, None), "[B, S]", INDEX_DTYPES)
        B, S = input_ids.shape
        if B == 0 or S == 0:
            raise ValueError(f"input_ids of shape {list(input_ids.shape)}: must hold at least one row of one token")
        if kv_cache is not None and not isinstance(kv_cache, KVCache):
            raise TypeError(f"kv_cache={type(kv_cache).__name__}: must be a KVCache or None")
        prompt = kv_cache is None or kv_cache.rope_deltas is None     # the first call on a cache holds the prompt
        context = min(cfg.context_length, kv_cache.max_len if kv_cache is not None else math.inf)
        if prompt and S > context:      # a decode step's position is on the device: its caller sizes the cache
            raise ValueError(f"sequence of {S} tokens is longer than the context ({context})")
        if kv_cache is not None and kv_cache.k[0].shape[0] != B:
            raise ValueError(f"kv_cache of batch size {kv_cache.k[0].shape[0]}: must be that of input_ids ({B})")
        if attention_mask is not None:
            K = kv_cache.max_len if kv_cache is not None else S
            _check_tensor("attention_mask", attention_mask, (B, None), f"[B, S] = [{B}, {S}]", None)
            if not S <= attention_mask.shape[1] <= K:
                cache = f" or up to [{B}, {K}] (the cache)" if K > S else ""
                raise ValueError(f"attention_mask of shape {list(attention_mask.shape)}: must be [{B}, {S}] "
                                 f"(as input_ids){cache}")
        if labels is not None:
            _check_tensor("labels", labels, (B, S), f"[B, S] = [{B}, {S}] (as input_ids)", INDEX_DTYPES)
        if loss_weights is not None:
            _check_tensor("loss_weights", loss_weights, (B, S), f"[B, S] = [{B}, {S}] (as input_ids)", FLOAT_DTYPES)
            if labels is None:
                raise ValueError("loss_weights without labels: they weigh the labels' loss terms")
        if document_ids is not None:
            _check_tensor("document_ids", document_ids, (B, S), f"[B, S] = [{B}, {S}] (as input_ids)", INDEX_DTYPES)
            if kv_cache is not None:
                raise ValueError("document_ids (packed training rows) cannot be used with a kv_cache")
        if position_ids is not None:
            _check_tensor("position_ids", position_ids, None, "", INDEX_DTYPES)
            if position_ids.shape not in ((3, B, S), (B, S)):
                raise ValueError(f"position_ids of shape {list(position_ids.shape)}: must be [3, {B}, {S}] (t, h, w) "
                                 f"or [{B}, {S}]")
        patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
        modalities = []                                 # (name, pixels' argument name, pixels, grid, placeholder id)
        for name, pixels, grid, token_id in (("image", pixel_values, image_grid_thw, self.cfg.image_token_id),
                                             ("video", pixel_values_videos, video_grid_thw, self.cfg.video_token_id)):
            pixels_name = "pixel_values" if name == "image" else "pixel_values_videos"
            if (pixels is None) != (grid is None):
                given = pixels_name if grid is None else f"{name}_grid_thw"
                raise ValueError(f"{given} without {f'{name}_grid_thw' if grid is None else pixels_name}: "
                                 "give both or neither")
            if pixels is not None:
                _check_tensor(pixels_name, pixels, (None, patch_dim), f"[N, {patch_dim}] (patch rows)", FLOAT_DTYPES)
                _check_tensor(f"{name}_grid_thw", grid, (None, 3), "[n, 3] (t, h, w per image or video)",
                              INDEX_DTYPES)
                if pixels.device != input_ids.device or grid.device != input_ids.device:
                    raise ValueError(f"{pixels_name} on {pixels.device}, {name}_grid_thw on {grid.device}: must be "
                                     f"on the device of input_ids ({input_ids.device})")
            modalities.append((name, pixels_name, pixels, grid, token_id))
        trope = self.cfg.video_time == "trope"                     # one block per video, placed by its seconds
        if trope and pixel_values_videos is not None and position_ids is None and prompt:
            if video_second_per_grid is None:
                raise ValueError("video_time='trope' needs video_second_per_grid [n_videos] (the processor returns "
                                 "it) to place the frame groups in time")
            _check_tensor("video_second_per_grid", video_second_per_grid, (video_grid_thw.shape[0],),
                          f"[{video_grid_thw.shape[0]}] (one per video)", FLOAT_DTYPES)
        if not (check_values and prompt):
            return

        # one read-back for the ids, labels, placeholders and pixels (the grids, a few numbers, come with their own)
        stats = {"min id": input_ids.min(), "max id": input_ids.max()}
        if labels is not None:
            stats.update({"min label": labels.masked_fill(labels == -100, 0).min(), "max label": labels.max()})
        for name, pixels_name, pixels, grid, token_id in modalities:
            placeholder = input_ids == token_id                                                # [B, S]
            block_start = placeholder & ~F.pad(placeholder, (1, 0))[:, :-1]                   # first of a run
            stats.update({f"{name} slots": placeholder.sum(), f"{name} blocks": block_start.sum()})
            if pixels is not None and check_finite:
                stats[f"{name} finite"] = torch.isfinite(pixels).all()
        stats = dict(zip(stats, torch.stack([s.long() for s in stats.values()]).tolist()))

        if stats["min id"] < 0 or stats["max id"] >= cfg.vocab_size:
            raise ValueError(f"input_ids holds ids from {stats['min id']} to {stats['max id']}: each must be in "
                             f"[0, {cfg.vocab_size - 1}] (text.vocab_size={cfg.vocab_size})")
        if labels is not None and (stats["min label"] < 0 or stats["max label"] >= cfg.vocab_size):
            raise ValueError(f"labels holds values from {stats['min label']} to {stats['max label']} (besides -100):"
                             f" each must be -100 (ignored) or in [0, {cfg.vocab_size - 1}]")
        m = v.spatial_merge_size
        for name, pixels_name, pixels, grid, token_id in modalities:
            rows = [] if grid is None else grid.tolist()
            if any(t < 1 or h < 1 or w < 1 or h % m or w % m for t, h, w in rows):
                raise ValueError(f"{name}_grid_thw={rows}: each (t, h, w) must be >= 1 with h and w multiples of "
                                 f"vision.spatial_merge_size={m}")
            n_rows = sum(t * h * w for t, h, w in rows)
            if pixels is not None and n_rows != pixels.shape[0]:
                raise ValueError(f"{name}_grid_thw={rows}: sum(t*h*w) = {n_rows} must equal the rows of "
                                 f"{pixels_name} ({pixels.shape[0]})")
            slots, runs = stats[f"{name} slots"], stats[f"{name} blocks"]
            if pixels is None and slots:
                raise ValueError(f"{name} placeholder tokens ({slots}) in input_ids: need {pixels_name} and "
                                 f"{name}_grid_thw")
            n_features, n_groups = n_rows // m ** 2, sum(t for t, _, _ in rows)
            if trope and name == "video":                # all frame groups of a video in one block
                n_groups = len(rows)
            if slots != n_features:
                raise ValueError(f"{name} placeholder tokens ({slots}) do not match the {name} features "
                                 f"({n_features} from grids {rows})")
            if runs != n_groups:
                unit = "video (video_time='trope')" if trope and name == "video" else f"{name} frame group"
                raise ValueError(f"{name} placeholder tokens come in {runs} runs: must be one run per {unit} "
                                 f"({n_groups} from grids {rows})")
            if pixels is not None and check_finite and not stats[f"{name} finite"]:
                raise ValueError(f"{pixels_name} holds NaN or infinite values: must be finite (check_finite=False "
                                 "skips this check)")

    def embed(self, input_ids, pixel_values=None, image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None,
              run_vision=False):
        """
        Token embeddings with visual features in the placeholder positions, and the DeepStack features laid out
        on the same sequence grid: x [B, S, H], deepstack list of [B, S, H] (zero outside visual positions) or None.
        Images and video frame groups go through the ViT together, packed in one sequence (attention stays inside
        each frame group). run_vision=True runs the ViT on a blank 2x2-patch image when there are no pixels and adds
        its output times zero: under FSDP every rank must run the same modules at every step (train.py).
        The inputs are those forward has checked (check_inputs): as many placeholders as features.
        """
        x = self.language_model.embed_tokens(input_ids)                                  # [B, S, H]
        parts = [(pixels, grid, token_id)                   # the pixels, grid and placeholder id of each modality
                 for pixels, grid, token_id in ((pixel_values, image_grid_thw, self.cfg.image_token_id),
                                                (pixel_values_videos, video_grid_thw, self.cfg.video_token_id))
                 if pixels is not None]
        if not parts:
            if not run_vision:
                return x, None
            v = self.cfg.vision
            blank = x.new_zeros(v.spatial_merge_size ** 2, v.in_channels * v.temporal_patch_size * v.patch_size ** 2)
            feats, ds = self.visual(blank, torch.tensor([[1, v.spatial_merge_size, v.spatial_merge_size]], device=x.device))
            return x + 0 * (feats.sum() + sum(d.sum() for d in ds)), None

        feats, ds = self.visual(torch.cat([p for p, _, _ in parts]),
                                torch.cat([g for _, g, _ in parts]))                      # [n_tok, H], L x [n_tok, H]
        deepstack = [torch.zeros_like(x) for _ in ds]                                     # [B, S, H] each
        start = 0
        for pixels, grid, token_id in parts:
            n = pixels.shape[0] // self.cfg.vision.spatial_merge_size ** 2               # merged tokens of this modality
            mask = (input_ids == token_id)[..., None]                                     # [B, S, 1]
            x = x.masked_scatter(mask, feats[start:start + n].to(x.dtype))
            deepstack = [z.masked_scatter(mask, d[start:start + n].to(x.dtype)) for z, d in zip(deepstack, ds)]
            start += n
        return x, deepstack

    def forward(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                pixel_values_videos=None, video_grid_thw=None, labels=None, position_ids=None, kv_cache=None,
                aux_loss=False, document_ids=None, run_vision=False, return_hidden=False, loss_weights=None,
                loss_reduction="mean", check_finite=True, video_second_per_grid=None, context_parallel=None):
        """
        input_ids [B, S]; attention_mask [B, S], 1 = real token, left padding (with a kv_cache: [B, past + S] or
        [B, max_len]); pixel_values [N, 1536] + image_grid_thw [n, 3]; pixel_values_videos + video_grid_thw likewise;
        labels [B, S] (-100 = ignored; shifted inside); position_ids [3, B, S] to override rope_index;
        video_second_per_grid [n_videos] float: seconds between a video's frame groups (read with video_time "trope");
        kv_cache: a KVCache to read and extend (generation); document_ids [B, S]: rows packing several samples
        (training) attend only within a sample (pass each sample's own position_ids too); run_vision: see embed.
        aux_loss (MoE): with labels, add router_aux_loss_coef x the load-balancing loss over every sparse layer
        (moe.load_balancing_loss, padding masked by attention_mask [B, S]). Off by default, as in the reference, which
        adds it only when called with output_router_logits=True.
        The loss (chunked_cross_entropy: the head and cross-entropy chunk by chunk, never [B, S, V] fp32 at once):
        with loss_reduction="mean" (default) the mean next-token cross-entropy over the targets; with "sum" their sum
        (a caller normalising over several micro-batches divides by its own count); loss_weights [B, S] float
        scales each label's term (aligned with labels: weight [b, s] for labels [b, s]).
        Returns logits [B, S, V] (return_hidden=True: the final normed hidden states [B, S, H] instead, what the head
        reads, so that no logits are made) and the loss (None without labels).
        attn_impl (self.attn_impl): see __init__; document_ids with "flex" give a block mask instead of [B, 1, S, S].
        context_parallel (train.py --cp): this rank's part of every row, an object with `positions(S)` -> [S / cp]
        (the row positions whose queries this rank computes) and `shard_mask(block_mask)` (the BlockMask of those
        queries against the whole row). The embedding (ViT included), positions and targets are made for the whole row, then
        only this rank's positions go through the decoder, under FlexAttention; hidden states, logits and the loss
        (use loss_reduction="sum") are this rank's part.
        The inputs are checked first (check_inputs: TypeError / ValueError): their shapes on every call, their values
        (ids in range, grids against pixels, finite pixels unless check_finite=False) unless decoding from a cache.
        After the call, `self.router_logits` holds the router logits [B*S, E] of every sparse layer (an empty tuple
        for a dense model), still in the autograd graph: a loss computed outside can add
        moe.load_balancing_loss(model.router_logits, k, mask), and moe.tokens_per_expert(...) gives the load per layer.
        """
        self.check_inputs(input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
                          labels, position_ids, kv_cache, document_ids, loss_weights, check_finite=check_finite,
                          video_second_per_grid=video_second_per_grid)
        prefill = kv_cache is None or kv_cache.rope_deltas is None      # the first call on a cache holds the prompt
        B, S = input_ids.shape
        cfg = self.cfg.text
        x, deepstack = self.embed(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, run_vision)
        # slots of these tokens in the sequence (and the cache), and how many keys they attend over: a decode step
        # the whole preallocated cache, so that every step has the same shapes; the prompt only its own
        q_pos = torch.arange(S, device=x.device) + (kv_cache.pos if kv_cache is not None else 0)   # [S]
        K = S if prefill else kv_cache.max_len

        if position_ids is None:
            if prefill:
                position_ids, rope_deltas = self.get_position_ids(input_ids, None if attention_mask is None
                                                                  else attention_mask[:, :S], image_grid_thw, video_grid_thw,
                                                                  video_second_per_grid)
                if kv_cache is not None:
                    kv_cache.rope_deltas = rope_deltas
            else:   # decoding continues every axis from the prefill's offset
                position_ids = q_pos[None] + kv_cache.rope_deltas                             # [B, S]
        freqs = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
        cos, sin = mrope_cos_sin(position_ids, freqs, cfg.mrope_section, cfg.mrope_layout)  # [B, S, hd] float32

        impl = self.attn_impl
        if impl not in ("auto", "sdpa", "flex"):
            raise ValueError(f"attn_impl must be 'auto', 'sdpa' or 'flex', not {impl!r}")
        if impl == "auto":
            impl = "flex" if x.is_cuda and document_ids is not None and kv_cache is None else "sdpa"
        if impl == "flex" or context_parallel is not None:
            if kv_cache is not None:
                raise ValueError("attn_impl='flex' and context_parallel run whole sequences (training, scoring); "
                                 "decode with 'sdpa'")
            mask = packed_block_mask(document_ids, attention_mask, S, x.device)
            if context_parallel is not None:      # this rank's queries only; keys and values are gathered (flex.py)
                mask, keep = context_parallel.shard_mask(mask), context_parallel.positions(S)     # keep [S / cp]
                x, cos, sin = x[:, keep], cos[:, keep], sin[:, keep]                              # [B, S / cp, ...]
                deepstack = None if deepstack is None else [d[:, keep] for d in deepstack]
        # otherwise a dense attention mask [B, 1, S, K]: causal (which also hides the cache slots not yet written) and
        # not padding; every query keeps its own key so that the rows of padding tokens never become all -inf (which
        # would turn them, and through v, others, into NaN). With a cache, attention_mask covers slots 0 .. past+S-1
        # (or all K): the slots after it hold generated tokens, which are always real.
        elif attention_mask is not None or not prefill or document_ids is not None:
            k_pos = torch.arange(K, device=x.device)                                       # [K]
            mask = k_pos[None, :] <= q_pos[:, None]                                        # [S, K]
            if attention_mask is not None:
                real = F.pad(attention_mask[:, :K].bool(), (0, K - min(K, attention_mask.shape[1])), value=True)  # [B, K]
                mask = mask & real[:, None, :]                                             # [B, S, K]
                mask = mask | (k_pos[None, :] == q_pos[:, None])
            if document_ids is not None:                                                   # packed samples
                mask = mask & (document_ids[:, :, None] == document_ids[:, None, :])       # [B, S, S]
            mask = mask.view(-1, 1, S, K)
        else:
            mask = None                                                                    # causal, in the kernel

        router_logits = []                                    # [B*S, E] of each sparse (MoE) layer, in order
        for i, layer in enumerate(self.language_model.layers):
            x, layer_router_logits = layer(x, cos, sin, mask, kv_cache, prefill)
            if layer_router_logits is not None:
                router_logits.append(layer_router_logits)
            if deepstack is not None and i < len(deepstack):
                x = x + deepstack[i]                          # DeepStack: zero except at visual positions
        if kv_cache is not None:
            kv_cache.pos.add_(S)                              # in place: a captured CUDA graph replays the advance
        x = self.language_model.norm(x)                                                    # [B, S, H]
        self.router_logits = tuple(router_logits)             # routing of this forward (statistics, aux loss)

        loss = None
        if labels is not None:      # position s predicts token s + 1: targets are the labels shifted left by one
            targets = F.pad(labels[:, 1:], (0, 1), value=-100)                             # [B, S]
            weights = None if loss_weights is None else F.pad(loss_weights[:, 1:], (0, 1))  # [B, S]
            if context_parallel is not None:          # shifted on the whole row, then this rank's part
                targets = targets[:, keep]                                                 # [B, S / cp]
                weights = None if weights is None else weights[:, keep]
            loss = chunked_cross_entropy(x, self.lm_head.weight, targets, weights, reduction=loss_reduction)
            if aux_loss and router_logits:     # MoE: + coef x Switch load-balancing loss (moe.py)
                loss = loss + cfg.router_aux_loss_coef * load_balancing_loss(router_logits, cfg.num_experts_per_tok,
                                                                             attention_mask)
        return (x if return_hidden else self.lm_head(x)), loss                            # [B, S, H] or [B, S, V]

    # ------------------------------------------------------------------------------------------------------
    # Checkpoints: Hugging Face Qwen3-VL directories (config.json + safetensors, one file or a sharded index)

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=None):
        """Build on the meta device, then load every tensor from the safetensors files (never pickle). Every
        parameter gets one dtype: `dtype`, or (None) the dtype most of the checkpoint's tensors are stored in, so
        that a tensor stored in another one cannot meet the others in a matmul. Errors: read_hf_config and
        checkpoint_tensors."""
        with torch.device("meta"):
            model = cls(read_hf_config(path))
        sd = dict(model.checkpoint_tensors(path))
        if dtype is None:
            dtype = Counter(t.dtype for t in sd.values()).most_common(1)[0][0]
        if model.cfg.tie_word_embeddings:
            sd["lm_head.weight"] = sd["language_model.embed_tokens.weight"]
        model.load_state_dict(sd, strict=True, assign=True)
        if model.cfg.tie_word_embeddings:
            model.lm_head.weight = model.language_model.embed_tokens.weight
        return model.to(device=device, dtype=dtype)

    def save_pretrained(self, path, format="v5", expert_layout=None, max_shard_bytes=5 * 2**30, processor=None,
                        tokenizer=None):
        """
        Write config.json and safetensors shards that `transformers` loads; files appear atomically.
        format: "v5" (transformers 5, the default) or "v4" (transformers 4.57), see HF_FORMATS.
        expert_layout (MoE): one of moe.EXPERT_LAYOUTS; by default the format's own ("fused_out_in" for v5,
        "fused_in_out" for v4, the layout of the released checkpoints).
        processor / tokenizer: also write their files (Processor.save_pretrained, Tokenizer.save_hf: the
        preprocessor configs, tokenizer.json, the chat template) and generation_config.json (the tokenizer's stop
        and padding ids), making a directory that transformers' AutoModelForImageTextToText, AutoProcessor and
        AutoTokenizer load. A processor brings its tokenizer.
        """
        from safetensors.torch import save_file
        if format not in HF_FORMATS:
            raise ValueError(f"unknown checkpoint format {format!r}; choose one of {sorted(HF_FORMATS)}")
        if expert_layout is not None and expert_layout not in EXPERT_LAYOUTS:
            raise ValueError(f"unknown expert layout {expert_layout!r}; choose one of {sorted(EXPERT_LAYOUTS)}")
        tokenizer = tokenizer or getattr(processor, "tok", None)
        if tokenizer is not None and tokenizer.n_vocab > self.cfg.text.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.n_vocab} ids, the model's embedding "
                             f"{self.cfg.text.vocab_size} rows")
        dtype = str(self.lm_head.weight.dtype).removeprefix("torch.")
        hf_cfg = {**self.cfg.to_hf_dict(format), "dtype" if format == "v5" else "torch_dtype": dtype}  # refuses an
        os.makedirs(path, exist_ok=True)                                     # ablated config before writing anything
        hf = self._to_hf_state_dict(expert_layout or HF_EXPERT_LAYOUT[format])
        shards, size = [[]], 0
        for key, t in hf.items():
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(key)
            size += nbytes
        names = ["model.safetensors"] if len(shards) == 1 else \
            [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for name, keys in zip(names, shards):
            atomic_write(os.path.join(path, name), lambda p: save_file({k: hf[k] for k in keys}, p, metadata={"format": "pt"}))
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in hf.values())},
                     "weight_map": {k: n for n, keys in zip(names, shards) for k in keys}}
            atomic_write(os.path.join(path, "model.safetensors.index.json"), lambda p: write_json(index, p))
        atomic_write(os.path.join(path, "config.json"), lambda p: write_json(hf_cfg, p))
        if processor is not None:
            processor.save_pretrained(path)
        if tokenizer is not None:
            tokenizer.save_hf(path)
            generation = {"bos_token_id": tokenizer.endoftext_id, "eos_token_id": tokenizer.eos_ids,
                          "pad_token_id": tokenizer.pad_id}
            atomic_write(os.path.join(path, "generation_config.json"), lambda p: write_json(generation, p))

    def checkpoint_tensors(self, path):
        """
        Yield (our parameter name, tensor) from a Hugging Face checkpoint directory one tensor at a time, after
        checking every name and shape against this model: missing, unexpected or mis-shaped tensors are an error
        naming them, and so is a tensor stored twice or in a dtype other than a float one (F16, BF16, F32, F64;
        quantized or integer tensors are refused before any is read). Tensors come in their stored dtype. MoE
        experts are read in whichever layout of moe.EXPERT_LAYOUTS the files hold (found from their names and
        shapes, layer by layer). With tied embeddings `lm_head.weight` is not yielded (the checkpoint may or may not
        store it). A sharded trainer places each tensor and drops it, never holding the whole model (train.py).
        """
        from contextlib import ExitStack
        from safetensors import safe_open
        ours = {k: v.shape for k, v in self.state_dict().items()}
        if self.cfg.tie_word_embeddings:
            ours.pop("lm_head.weight")
        experts = {n.removesuffix(".gate_up_proj") for n in ours if n.endswith(".mlp.experts.gate_up_proj")}
        with ExitStack() as stack:
            where, unexpected = {}, []                       # our name -> (open file, checkpoint key)
            expert_parts = {}                     # experts prefix -> {key below it: (open file, key, shape, file)}
            for file in checkpoint_files(path):
                try:
                    f = stack.enter_context(safe_open(file, framework="pt", device="cpu"))
                    keys = {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}
                except Exception as e:
                    raise ValueError(f"cannot read safetensors file {file!r}: {e}") from e
                for key, (shape, dtype) in keys.items():
                    name = hf_to_ours(key)
                    prefix = name.split(".experts.")[0] + ".experts"
                    if prefix in experts:
                        expert_parts.setdefault(prefix, {})[name[len(prefix) + 1:]] = (f, key, shape, file)
                        continue
                    if name not in ours:
                        if not (key == "lm_head.weight" and self.cfg.tie_word_embeddings):
                            unexpected.append(key)
                        continue
                    if name in where:
                        raise ValueError(f"checkpoint tensor {key!r} is stored twice (again in {file!r})")
                    if dtype not in ("F16", "BF16", "F32", "F64"):
                        raise ValueError(f"checkpoint tensor {key!r} has dtype {dtype}: only float tensors (F16, BF16, "
                                         "F32, F64) are loaded")
                    if name == PATCH_EMBED:                  # Conv3d [D, 3, 2, 16, 16] -> Linear [D, 1536]
                        shape = [shape[0], math.prod(shape[1:])]
                    if list(shape) != list(ours[name]):
                        raise ValueError(f"checkpoint tensor {key!r} has shape {list(shape)}, the config expects "
                                         f"{list(ours[name])}")
                    where[name] = (f, key)
            layouts = {}
            for prefix, parts in expert_parts.items():
                t = self.cfg.text
                files = ", ".join(sorted({file for *_, file in parts.values()}))
                layouts[prefix] = expert_layout_of({k: s for k, (_, _, s, _) in parts.items()}, t.num_experts,
                                                   t.hidden_size, t.moe_intermediate_size,
                                                   where=f"{files}: {ours_to_hf(prefix)}")
            found = set(where) | {f"{p}.{w}" for p in layouts for w in ("gate_up_proj", "down_proj")}
            missing = sorted(set(ours) - found)
            if missing or unexpected:
                raise ValueError(f"checkpoint does not match the config: missing {missing[:10]}"
                                 f"{' ...' if len(missing) > 10 else ''} ({len(missing)}), unexpected "
                                 f"{unexpected[:10]}{' ...' if len(unexpected) > 10 else ''} ({len(unexpected)})")
            for name, (f, key) in where.items():
                t = f.get_tensor(key)
                yield name, t.reshape(ours[name]) if name == PATCH_EMBED else t
            for prefix, layout in layouts.items():
                parts = expert_parts[prefix]
                gate_up, down = experts_from_checkpoint(layout, lambda k: parts[k][0].get_tensor(parts[k][1]),
                                                        self.cfg.text.num_experts)
                yield f"{prefix}.gate_up_proj", gate_up
                yield f"{prefix}.down_proj", down

    def _to_hf_state_dict(self, expert_layout="fused_out_in"):
        """Our tensors under the checkpoint's key names (HF_PREFIXES), experts in `expert_layout`."""
        v = self.cfg.vision
        sd = self.state_dict()
        hf = {}
        for name, t in sd.items():
            if name == "lm_head.weight" and self.cfg.tie_word_embeddings:
                continue
            if name.endswith(".mlp.experts.down_proj"):    # written with its gate_up_proj
                continue
            if name.endswith(".mlp.experts.gate_up_proj"):
                prefix = name.removesuffix("gate_up_proj")
                for k, w in experts_to_checkpoint(t, sd[prefix + "down_proj"], expert_layout).items():
                    hf[ours_to_hf(prefix + k)] = w.detach().contiguous()
                continue
            if name == PATCH_EMBED:                        # Linear [D, 1536] -> Conv3d [D, 3, 2, 16, 16]
                t = t.reshape(-1, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
            hf[ours_to_hf(name)] = t.detach().contiguous()
        return hf
