"""
FlexAttention (torch.nn.attention.flex_attention) for packed sequences: attention restricted by a mask written as a
function of (row, head, query index, key index), run by a kernel that visits only the blocks the mask keeps. No
[S, S] mask tensor exists: a BlockMask lists, for each block of 128 queries, the blocks of 128 keys it reads (and
which of them are full, where the kernel skips the mask function).

On CUDA the kernel and the block-mask builder are compiled (torch.compile, lazily on first use; a new sequence
length recompiles once, after which the shapes are dynamic). On the CPU the eager implementations run: the same
semantics through a dense score matrix, which is what the tests compare against the dense-mask paths (torch refuses
backward through FlexAttention on the CPU; the tests lift that guard, the eager math differentiates exactly).
"""
import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

__all__ = ["Attention", "BlockMask", "attention", "block_mask"]


@functools.cache
def _compiled(fn):
    return torch.compile(fn)


def attention(q, k, v, mask):
    """q [B, nh, S, hd], k and v [B, nkv, S, hd] (nh a multiple of nkv: grouped-query), mask a BlockMask of
    [B or 1, 1, S, S] -> [B, nh, S, hd]."""
    run = _compiled(flex_attention) if q.is_cuda else flex_attention
    return run(q, k, v, block_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


class Attention(torch.nn.Module):
    """`attention` as a module (no parameters): the unit torch's context parallelism wraps. Under train.py --cp a
    forward pre-hook (torch.distributed.tensor.experimental._context_parallel._ContextParallel, FLEX) all-gathers the
    keys and values of every rank's part of the row, and the block mask is the one for this rank's queries."""

    def forward(self, q, k, v, mask):
        return attention(q, k, v, mask)


def block_mask(mask_mod, batch, length, device):
    """The BlockMask of mask_mod(b, h, q_idx, kv_idx) -> bool over `batch` rows of `length` queries and keys, the
    same for every head. Compiled on CUDA so that the [batch, length, length] booleans are never materialised."""
    build = _compiled(create_block_mask) if device.type == "cuda" else create_block_mask
    return build(mask_mod, batch, None, length, length, device=device)
