"""
Training speed of the fast paths against the paths they replace, on packed multimodal rows (random weights, random
pixels, an image or a video in every packed sample), forward + backward, one table:

1. whole-model training steps: "dense" = SDPA with the dense [B, 1, S, S] document mask and the per-size ViT batches,
   cross-entropy of the full [B, S, V] logits (today's train.py); "flex" = FlexAttention block masks in the decoder
   and the ViT, same loss; "flex+chunked" = that plus chunked_cross_entropy (return_hidden). For the qwen3-vl-8b shape
   (bf16 parameters, as FSDP computes; 1 x 8192 tokens) and toy-gpu (fp32 parameters under bf16 autocast, as
   train.py on one GPU; 16 x 2048 tokens). Tokens/s, MFU, peak memory, and the loss's relative gap to "dense".
2. the ViT and its mergers alone on mixed image sizes and videos: per-size dense batches vs FlexAttention.
3. the loss alone at the 8B head (8192 tokens, V = 151936): full logits + cross-entropy vs chunked, peak memory.

MFU = model FLOPs / time / 989e12 (H100/H200 dense bf16), train.py's: train.model_flops (6 x the matrix parameters
each token, patch and merged token passes through, + 12 x width x the (query, key) pairs each layer scores: per
packed document, causal, in the decoder; per frame group in the ViT).

    python bench/train_speed.py --smoke      # CPU, tiny shapes, a minute: checks that everything runs
    python bench/train_speed.py              # CUDA (one H200): the table above
"""
import argparse
import os
import statistics
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repo root
import train  # noqa: E402
from compare import build  # noqa: E402  (bench/compare.py: random weights drawn on the device)
from model import Qwen3VL, Qwen3VLConfig, chunked_cross_entropy  # noqa: E402
from rope import rope_index  # noqa: E402
from vision import VisionEncoder  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes (toy-cpu), a check that it all runs")
parser.add_argument("--layers", type=int, help="decoder layers of the 8B shape (default: all 36)")
parser.add_argument("--iters", type=int, default=5, help="timed steps per measurement (the median is reported)")
parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (FlexAttention compiles on the first)")
parser.add_argument("--only", nargs="+", choices=["8b", "toy", "vit", "loss"], help="run only these parts")
args = parser.parse_args()

PEAK = 989e12
if args.smoke:
    # torch refuses backward through FlexAttention on the CPU (a device guard); its eager implementation, a dense
    # score matrix, differentiates exactly (tests/conftest.py lifts the guard the same way)
    import warnings
    import torch.nn.attention.flex_attention as fa
    fa._validate_device = lambda *tensors: None
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")   # eager on purpose
    device = torch.device("cpu")
else:
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --smoke on the CPU")
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
gpu = device.type == "cuda"
rows_out = []                                       # the table: one dict per measured line


# ----------------------------------------------------------------------------------------------------------
# Packed multimodal rows


def packed_rows(cfg, n_rows, seq_len, grids, text_len, seed=0):
    """
    n_rows rows of seq_len tokens, each packing samples "text, an image or a video (grid drawn from `grids`), text"
    (text_len: the range of the first text's length; the second is half as long) until the next does not fit; the tail is padding, each pad token a document of its own (as train.collate). Every
    sample has its own 3-D positions. Returns the model kwargs and the labels (text tokens; -100 elsewhere).
    """
    g = torch.Generator().manual_seed(seed)
    m2 = cfg.vision.spatial_merge_size ** 2
    text = lambda n: torch.randint(0, cfg.image_token_id - 8, (n,), generator=g)      # noqa: E731
    ids = torch.zeros(n_rows, seq_len, dtype=torch.long)
    labels = torch.full((n_rows, seq_len), -100, dtype=torch.long)
    docs = torch.zeros(n_rows, seq_len, dtype=torch.long)
    pos = torch.zeros(3, n_rows, seq_len, dtype=torch.long)
    pix, pix_grid, vid, vid_grid = [], [], [], []
    for r in range(n_rows):
        n, d = 0, 0
        while True:
            t, h, w = grids[int(torch.randint(len(grids), (1,), generator=g))]
            video = t > 1
            block = [cfg.vision_start_token_id] + [cfg.video_token_id if video else cfg.image_token_id] * (h * w // m2) \
                + [cfg.vision_end_token_id]
            visual = torch.tensor(block * t if not video else sum(([*text(3).tolist(), *block] for _ in range(t)), []))
            s = torch.cat([text(int(torch.randint(*text_len, (1,), generator=g))), visual,
                           text(int(torch.randint(*text_len, (1,), generator=g)) // 2)])
            if n + len(s) > seq_len:
                break
            grid = torch.tensor([[t, h, w]])
            p, _ = rope_index(s[None], None, None if video else grid, grid if video else None,
                              image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
                              spatial_merge_size=cfg.vision.spatial_merge_size)
            L = len(s)
            ids[r, n:n + L], docs[r, n:n + L], pos[:, r, n:n + L] = s, d, p[:, 0]
            lab = s.masked_fill((s == cfg.image_token_id) | (s == cfg.video_token_id), -100)
            lab[0] = -100
            labels[r, n:n + L] = lab
            (vid if video else pix).append(torch.randn(t * h * w, 1536, generator=g))
            (vid_grid if video else pix_grid).append(grid)
            n, d = n + L, d + 1
        docs[r, n:] = torch.arange(d, d + seq_len - n)
    kw = dict(input_ids=ids, document_ids=docs, position_ids=pos)
    if pix:
        kw.update(pixel_values=torch.cat(pix), image_grid_thw=torch.cat(pix_grid))
    if vid:
        kw.update(pixel_values_videos=torch.cat(vid), video_grid_thw=torch.cat(vid_grid))
    return {k: v.to(device) for k, v in kw.items()}, labels.to(device)


def step_flops(model, kw):
    """Model FLOPs of a training step: train.model_flops on the batch's documents and frame groups."""
    return train.model_flops(model.cfg, train.flop_counts(model), kw["input_ids"].numel(),
                             train.document_lengths(kw["document_ids"].cpu()), train.frame_sizes(kw))


# ----------------------------------------------------------------------------------------------------------
# Timing


def measure(step):
    """(median seconds per step, peak memory in GiB over the timed steps, the first step's return value)."""
    first = step()
    for _ in range(args.warmup - 1):
        step()
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        step()
        if gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if gpu else float("nan")
    return statistics.median(times), peak, first


def record(case, path, seconds, peak, tokens=None, flops=None, note=""):
    rows_out.append(dict(case=case, path=path, ms=seconds * 1e3, tok_s=tokens / seconds if tokens else None,
                         mfu=flops / seconds / PEAK if flops and gpu else None, peak=peak, note=note))


def attempt(case, path, fn):
    """Run one measurement; an out-of-memory or a compile failure becomes a line of the table, not the end."""
    try:
        return fn()
    except Exception as e:                                                            # noqa: BLE001
        if gpu:
            torch.cuda.empty_cache()
        rows_out.append(dict(case=case, path=path, ms=None, tok_s=None, mfu=None, peak=None,
                             note=f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:90] if str(e) else ''}"))
        return None


# ----------------------------------------------------------------------------------------------------------
# 1. Whole-model training steps


def model_steps(case, cfg, n_rows, seq_len, grids, dtype, autocast, text_len=(16, 96)):
    model = build(lambda: Qwen3VL(cfg), dtype, device).train()
    kw, labels = packed_rows(cfg, n_rows, seq_len, grids, text_len)
    n_target = (labels[:, 1:] != -100).sum()
    tokens, flops = labels.numel(), step_flops(model, kw)
    visual = int(((kw["input_ids"] == cfg.image_token_id) | (kw["input_ids"] == cfg.video_token_id)).sum())
    case = f"{case}: {n_rows} x {seq_len} tokens ({visual / tokens:.0%} visual), {cfg.text.num_hidden_layers} layers"

    def step(impl, chunked):
        def run():
            model.attn_impl = model.visual.attn_impl = impl
            with torch.autocast(device.type, dtype=torch.bfloat16) if autocast else nullcontext():
                if chunked:
                    _, loss = model(**kw, labels=labels, loss_reduction="sum", return_hidden=True)
                    loss = loss / n_target
                else:                                   # train.py today: the full logits, then the cross-entropy
                    logits, _ = model(**kw)
                    loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                                           ignore_index=-100, reduction="sum") / n_target
            loss.backward()
            model.zero_grad(set_to_none=True)
            return loss.item()
        return run

    base = None
    for path, impl, chunked in (("dense", "sdpa", False), ("flex", "flex", False), ("flex+chunked", "flex", True)):
        got = attempt(case, path, lambda: measure(step(impl, chunked)))
        if got is None:
            continue
        seconds, peak, loss = got
        base = loss if base is None else base
        record(case, path, seconds, peak, tokens, flops, note=f"loss {loss:.4f} (gap {abs(loss - base) / base:.1e})")
    del model


# ----------------------------------------------------------------------------------------------------------
# 2. The ViT alone


def vit_steps(case, cfg, grids, dtype):
    vit = build(lambda: VisionEncoder(cfg.vision), dtype, device)
    grid = torch.tensor(grids, device=device)
    N = int(grid.prod(-1).sum())
    pixels = torch.randn(N, 1536, device=device, dtype=dtype)
    flops = train.model_flops(cfg, train.param_counts(cfg)[3], 0, [], train.frame_sizes({"image_grid_thw": grid}))
    case = f"{case}: {len(grids)} images/videos, {N} patches"

    def step(impl):
        def run():
            vit.attn_impl = impl
            tokens, deepstack = vit(pixels, grid)
            loss = tokens.float().square().mean() + sum(d.float().square().mean() for d in deepstack)
            loss.backward()
            vit.zero_grad(set_to_none=True)
            return tokens.detach().float()
        return run

    base = None
    for path, impl in (("per-size SDPA", "sdpa"), ("flex", "flex")):
        got = attempt(case, path, lambda: measure(step(impl)))
        if got is None:
            continue
        seconds, peak, tokens = got
        base = tokens if base is None else base
        gap = ((tokens - base).abs().max() / base.abs().max()).item()
        record(case, path, seconds, peak, N, flops, note=f"tokens gap {gap:.1e} (tok/s: patches/s)")
    del vit


# ----------------------------------------------------------------------------------------------------------
# 3. The loss alone


def loss_steps(case, T, H, V, dtype):
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(T, H, device=device, dtype=dtype, generator=g).requires_grad_()
    weight = (torch.randn(V, H, device=device, dtype=dtype, generator=g) * 0.02).requires_grad_()
    targets = torch.randint(0, V, (T,), device=device, generator=g)
    case = f"{case}: {T} tokens, H {H}, V {V}, {str(dtype).removeprefix('torch.')}"

    def full():
        loss = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")
        loss.backward()
        hidden.grad = weight.grad = None
        return loss.item()

    def chunked():
        loss = chunked_cross_entropy(hidden, weight, targets, reduction="sum")
        loss.backward()
        hidden.grad = weight.grad = None
        return loss.item()

    base = None
    for path, fn in (("full logits", full), ("chunked", chunked)):
        got = attempt(case, path, lambda: measure(fn))
        if got is None:
            continue
        seconds, peak, loss = got
        base = loss if base is None else base
        record(case, path, seconds, peak, T, 6 * T * H * V, note=f"loss gap {abs(loss - base) / base:.1e}")


# ----------------------------------------------------------------------------------------------------------
# The runs


parts = set(args.only or ["8b", "toy", "vit", "loss"])
if args.smoke:
    toy = Qwen3VLConfig.from_preset("toy-cpu", text=dict(num_hidden_layers=2, vocab_size=1024), image_token_id=1020,
                                    video_token_id=1021, vision_start_token_id=1022, vision_end_token_id=1023,
                                    vision=dict(depth=2, deepstack_visual_indexes=[0, 1]))
    small = [(1, 4, 4), (1, 4, 6), (1, 6, 4), (2, 4, 4)]
    if parts & {"8b", "toy"}:
        model_steps("toy-cpu", toy, 2, 256, small, torch.float32, autocast=False, text_len=(4, 16))
    if "vit" in parts:
        vit_steps("toy-cpu ViT", toy, [[1, 4, 6], [1, 8, 4], [2, 4, 4], [1, 2, 10]], torch.float32)
    if "loss" in parts:
        loss_steps("loss", 512, 64, 1024, torch.float32)
else:
    if "8b" in parts:
        layers = args.layers or 36
        cfg = Qwen3VLConfig.from_preset("qwen3-vl-8b", text=dict(num_hidden_layers=layers))
        grids = [(1, 16, 16), (1, 24, 32), (1, 32, 32), (1, 28, 40), (1, 48, 20), (1, 12, 60), (2, 16, 24), (4, 12, 16)]
        model_steps("qwen3-vl-8b bf16", cfg, 1, 8192, grids, torch.bfloat16, autocast=False)
    if "toy" in parts:
        V = 8192
        cfg = Qwen3VLConfig.from_preset("toy-gpu", image_token_id=V - 4, video_token_id=V - 3,
                                        vision_start_token_id=V - 2, vision_end_token_id=V - 1)
        grids = [(1, 8, 8), (1, 8, 12), (1, 12, 8), (1, 16, 16), (4, 8, 8)]               # toy-world 128 px images
        model_steps("toy-gpu autocast", cfg, 16, 2048, grids, torch.float32, autocast=True)
    if "vit" in parts:
        cfg = Qwen3VLConfig.from_preset("qwen3-vl-8b")
        mixed = [[1, 28, 28]] * 8 + [[1, 16, 16], [1, 24, 40], [1, 32, 32], [1, 56, 20], [1, 12, 64], [1, 40, 40],
                                     [1, 8, 8], [1, 20, 36]] + [[8, 16, 24]] * 2
        vit_steps("qwen3-vl-8b ViT bf16", cfg, mixed, torch.bfloat16)
    if "loss" in parts:
        loss_steps("8b head + cross-entropy", 8192, 4096, 151936, torch.bfloat16)

print(f"device: {torch.cuda.get_device_name() if gpu else 'cpu'}; median of {args.iters} steps after {args.warmup}; "
      f"MFU against {PEAK / 1e12:.0f} TFLOP/s" + ("" if gpu else " (not on the CPU)"))
print(f"{'case':<64s} {'path':<14s} {'ms/step':>9s} {'tok/s':>10s} {'MFU':>6s} {'peak GiB':>9s}  check")
cell = lambda v, spec, width: f"{'-':>{width}s}" if v is None or v != v else format(v, spec)   # noqa: E731
for r in rows_out:
    mfu = cell(None if r["mfu"] is None else 100 * r["mfu"], "5.1f", 5) + ("%" if r["mfu"] is not None else " ")
    print(f"{r['case']:<64s} {r['path']:<14s} {cell(r['ms'], '9.1f', 9)} {cell(r['tok_s'], '10.0f', 10)} {mfu:>6s} "
          f"{cell(r['peak'], '9.1f', 9)}  {r['note']}")
