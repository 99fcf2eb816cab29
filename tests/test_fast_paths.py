"""The training fast paths equal the paths they stand in for (fp32, CPU): FlexAttention with a block mask against
the dense-mask attention on packed rows (decoder) and against the per-size dense batches (ViT), and the chunked
cross-entropy against the cross-entropy of the full logits; values and gradients."""
import pytest
import torch
import torch.nn.functional as F
from conftest import IMG, VID, make_batch, make_row

import train
from model import KVCache, chunked_cross_entropy
from rope import rope_index

PAD = 151643


def packed_sample(parts, g):
    """One sample as train.Packer.encode makes it: ids, labels on the text, its own 3-D positions, pixels, grids."""
    ids, img_g, img_p, vid_g, vid_p = make_row(parts, g)
    ids = torch.tensor(ids)
    ig = torch.tensor(img_g) if img_g else None
    vg = torch.tensor(vid_g) if vid_g else None
    pos, _ = rope_index(ids[None], None, ig, vg, image_token_id=IMG, video_token_id=VID, spatial_merge_size=2)
    labels = ids.masked_fill((ids == IMG) | (ids == VID), -100)
    labels[0] = -100
    return dict(ids=ids, labels=labels, pos=pos[:, 0], pv=torch.cat(img_p) if img_p else None, ig=ig,
                pvv=torch.cat(vid_p) if vid_p else None, vg=vg)


def packed_batch(seed=0):
    """Two rows of 96 tokens packing 2 and 3 samples (images of several sizes, a video, text), padded at the end
    (train.collate: each padding token a document of its own). Returns model kwargs, labels, per-label weights."""
    g = torch.Generator().manual_seed(seed)
    rows = [[packed_sample([("text", 5), ("image", (1, 4, 6)), ("text", 7)], g),
             packed_sample([("text", 3), ("video", (2, 4, 4)), ("text", 4)], g)],
            [packed_sample([("text", 9)], g),
             packed_sample([("image", (1, 8, 4)), ("text", 2), ("image", (1, 2, 2))], g),
             packed_sample([("text", 4), ("video", (3, 4, 2)), ("text", 6)], g)]]
    batch = train.collate(rows, 96, PAD)
    labels = batch.pop("labels")
    batch.pop("real")
    assert (batch["input_ids"][:, -3:] == PAD).all()                     # both rows end in padding
    weights = torch.rand(labels.shape, generator=g) + 0.5                 # [B, S], as per-sample loss weights
    return {k: v for k, v in batch.items() if v is not None}, labels, weights


def run(model, kw, **extra):
    """Forward + backward of the summed, weighted loss: (logits, loss, {parameter: gradient})."""
    logits, loss = model(**kw, **extra)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return logits.detach(), loss.detach(), grads


@pytest.fixture
def llm_impl(pair):
    """Sets the decoder's attention path; puts "auto" back after the test."""
    _, ours = pair
    yield lambda impl: setattr(ours, "attn_impl", impl)
    ours.attn_impl = "auto"


def test_flex_decoder_attention_equals_dense_mask_on_packed_rows(pair, llm_impl, flex_backward_on_cpu):
    """Packed rows (document_ids) with images, videos and padding: the logits, the summed weighted loss and every
    gradient of the FlexAttention path equal those of the dense [B, 1, S, S] mask path."""
    _, ours = pair
    kw, labels, weights = packed_batch()
    out = {}
    for impl in ("sdpa", "flex"):
        llm_impl(impl)
        out[impl] = run(ours, kw, labels=labels, loss_weights=weights, loss_reduction="sum")
    (l_sdpa, loss_sdpa, g_sdpa), (l_flex, loss_flex, g_flex) = out["sdpa"], out["flex"]
    torch.testing.assert_close(l_flex, l_sdpa, rtol=0, atol=1e-5)
    torch.testing.assert_close(loss_flex, loss_sdpa, rtol=1e-6, atol=0)
    assert g_flex.keys() == g_sdpa.keys() and len(g_sdpa) == len(list(ours.parameters()))
    for n in g_sdpa:      # fp32 rounding of sums in another order: measured <= 1.5e-6 of each gradient's largest entry
        assert (g_flex[n] - g_sdpa[n]).abs().max() <= 1e-5 * g_sdpa[n].abs().max(), n


def test_flex_decoder_attention_with_left_padding(pair, llm_impl):
    """Without document_ids, the block mask follows attention_mask (left padding) as the dense mask does."""
    _, ours = pair
    kw = make_batch([[("text", 3), ("image", (1, 4, 6)), ("video", (2, 4, 4)), ("text", 5)],
                     [("text", 4), ("image", (1, 2, 2)), ("text", 2)]])
    assert (kw["attention_mask"] == 0).any()
    with torch.no_grad():
        llm_impl("sdpa")
        dense, _ = ours(**kw)
        llm_impl("flex")
        flexed, _ = ours(**kw)
    torch.testing.assert_close(flexed, dense, rtol=0, atol=1e-5)


def test_flex_decoder_attention_refuses_a_kv_cache(pair, llm_impl):
    _, ours = pair
    llm_impl("flex")
    cache = KVCache(ours.cfg.text, 1, 16)
    with pytest.raises(ValueError, match="decode with 'sdpa'"):
        ours(torch.tensor([[1, 2, 3]]), kv_cache=cache)
    llm_impl("dense")
    with pytest.raises(ValueError, match="attn_impl must be"):
        ours(torch.tensor([[1, 2, 3]]))


def test_packed_rows_leave_no_dense_mask_under_flex(pair, llm_impl, monkeypatch):
    """The flex path hands the layers a BlockMask, never a [B, 1, S, S] tensor (the O(S^2) memory it removes)."""
    import flex
    _, ours = pair
    kw, _, _ = packed_batch()
    seen = []
    layer = ours.language_model.layers[0].self_attn
    forward = layer.forward
    monkeypatch.setattr(layer, "forward", lambda x, cos, sin, mask, *cache: seen.append(mask) or
                        forward(x, cos, sin, mask, *cache))
    with torch.no_grad():
        for impl in ("sdpa", "flex"):
            llm_impl(impl)
            ours(**kw)
    dense, block = seen
    assert dense.shape == (2, 1, 96, 96) and isinstance(block, flex.BlockMask)


def test_return_hidden_and_weighted_sum_loss(pair):
    """return_hidden gives what the head reads (head(hidden) = the logits), and the weighted summed loss is
    sum_s w[s] * CE(logits[s - 1], labels[s]) over the labels kept."""
    _, ours = pair
    kw, labels, weights = packed_batch(seed=1)
    with torch.no_grad():
        logits, mean = ours(**kw, labels=labels)
        hidden, total = ours(**kw, labels=labels, loss_weights=weights, loss_reduction="sum", return_hidden=True)
    assert hidden.shape == (*labels.shape, ours.cfg.text.hidden_size)
    torch.testing.assert_close(ours.lm_head(hidden), logits, rtol=0, atol=1e-6)
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="none")   # 0 if ignored
    torch.testing.assert_close(total, (ce * weights[:, 1:].flatten()).sum(), rtol=1e-6, atol=0)
    torch.testing.assert_close(mean, ce.sum() / (labels[:, 1:] != -100).sum(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("weighted", [False, True])
def test_chunked_cross_entropy_equals_full(reduction, weighted):
    """Chunks that do not divide the tokens, ignored targets, optional weights: the loss and the gradients of the
    hidden states and the head equal those of the cross-entropy of the full logits."""
    g = torch.Generator().manual_seed(0)
    B, S, H, V = 3, 37, 24, 301
    hidden = torch.randn(B, S, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (B, S), generator=g).masked_fill(torch.rand(B, S, generator=g) < 0.3, -100)
    weights = torch.rand(B, S, generator=g) + 0.5 if weighted else None

    loss = chunked_cross_entropy(hidden, weight, targets, weights, reduction=reduction, chunk_size=16)
    grads = torch.autograd.grad(loss, (hidden, weight))
    ce = F.cross_entropy(F.linear(hidden, weight).flatten(0, 1), targets.flatten(), reduction="none")
    full = (ce if weights is None else ce * weights.flatten()).sum()
    full = full / (targets != -100).sum() if reduction == "mean" else full
    full_grads = torch.autograd.grad(full, (hidden, weight))
    torch.testing.assert_close(loss, full, rtol=1e-6, atol=0)
    for a, b in zip(grads, full_grads):     # the head's gradient sums over chunks: measured <= 2e-7 of its largest entry
        assert (a - b).abs().max() <= 1e-6 * b.abs().max()


def test_chunked_cross_entropy_keeps_no_logits():
    """What the autograd graph saves for the backward: the full cross-entropy keeps [T, V] logits, the chunked one
    keeps only its inputs (the hidden states and the head), so its memory does not grow with T x V."""
    g = torch.Generator().manual_seed(0)
    T, H, V = 64, 8, 500
    hidden = torch.randn(T, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (T,), generator=g)

    def largest_saved(fn):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            fn()
        return max(sizes)

    assert largest_saved(lambda: F.cross_entropy(F.linear(hidden, weight), targets)) >= T * V
    assert largest_saved(lambda: chunked_cross_entropy(hidden, weight, targets, chunk_size=16)) == V * H


def test_chunked_cross_entropy_refuses_an_unknown_reduction():
    with pytest.raises(ValueError, match="reduction must be"):
        chunked_cross_entropy(torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(2, dtype=torch.long), reduction="none")
