"""
Ours against the reference (Hugging Face transformers, the installed version), side by side on one GPU in one run,
on the same random weights: our model is built from a preset's config, exported with our own checkpoint code
(Qwen3VL._to_hf_state_dict: the key table of config.py, the experts in the installed version's layout) and loaded
into the reference's model, with its fastest attention ("flash_attention_2" when the flash_attn package is there,
else "sdpa") and, for the MoE layer, its fastest experts implementation ("grouped_mm").

Rows (forward + backward where it says "train", bf16 parameters, no optimizer; median of --iters after --warmup):
1. train: the qwen3-vl-8b shape with --layers decoder layers, the same image-text samples both ways. Ours packs them
   into one row of --seq_len tokens as train.py does (train.collate: document ids, each sample's 3-D positions),
   FlexAttention in the decoder and the ViT, chunked loss. The reference trains them the way its users do: padded
   batches (right padding, attention_mask), as many samples per batch as fit --seq_len padded tokens, gradients
   accumulated over the batches of the row. Useful (non-pad) tokens/s for both; our MFU with train.py's formula
   (train.model_flops of the row's documents and frame groups per second, over PEAK_FLOPS).
2. vit: the 8B ViT and its mergers (of row 1's models) on a batch of images of mixed sizes; patches/s.
3. prefill: the whole qwen3-vl-8b, a --prefill_len prompt at batch 1: time to the first token of generate.
   decode: --new tokens after a --decode_len prompt at batch 1 and 32, each token timed when it reaches the host.
   Ours: sample.generate(cuda_graph=True) after fuse_projections (what `sample.py --compile` runs); the reference:
   generate with cache_implementation="static", which compiles its decode step by itself (torch.compile,
   "reduce-overhead") when it can; the table says whether it did. HBM bandwidth = (the LLM's weights + the keys and
   values of the filled cache slots, on average over the decode) / step time, against the H200's 4.8 TB/s.
4. moe: one 30B-A3B MoE layer (128 experts, top-8, hidden 2048, expert intermediate 768), --moe_tokens tokens.

A row that fails (a reference feature missing, out of memory) prints its error in the table; the others still run.

    python bench/compare.py --out out/compare.md           # one H200: the table, also in out/compare.{md,json}
    python bench/compare.py --smoke                         # CPU, tiny shapes, float32: checks that every row runs
"""
import argparse
import json
import os
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repo root
from config import HF_EXPERT_LAYOUT, Qwen3VLConfig, TextConfig  # noqa: E402
from model import Qwen3VL  # noqa: E402
from moe import SparseMoeBlock, experts_to_checkpoint  # noqa: E402
from rope import rope_index  # noqa: E402
from sample import generate  # noqa: E402
from train import PEAK_FLOPS, collate, document_lengths, flop_counts, frame_sizes, model_flops  # noqa: E402

HBM_BYTES_PER_S = 4.8e12          # H200 datasheet
PAD_ID = 151643                   # <|endoftext|> (the smoke test's small vocabulary pads with 0)
TARGETS = {"train MFU": 0.45, "train": 1.5, "vit": 2.0, "decode b1 HBM": 0.70, "decode b32": 5.0, "moe": 1.5}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, float32, 1-2 iterations: every row runs")
    p.add_argument("--rows", nargs="+", default=["train", "vit", "decode", "moe"],
                   choices=["train", "vit", "decode", "moe"], help="which rows (decode: prefill and decode)")
    p.add_argument("--layers", type=int, default=8, help="decoder layers of the 8B shape in the train row")
    p.add_argument("--seq_len", type=int, default=8192, help="tokens of our packed row (and padded tokens per "
                   "reference batch)")
    p.add_argument("--prefill_len", type=int, default=4096)
    p.add_argument("--decode_len", type=int, default=512, help="prompt tokens before the decode")
    p.add_argument("--new", type=int, default=64, help="decoded tokens per row")
    p.add_argument("--moe_tokens", type=int, default=8192)
    p.add_argument("--iters", type=int, default=10, help="timed iterations (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first (compilation happens there)")
    p.add_argument("--out", help="write the table to this markdown file and the numbers to its .json beside it")
    args = p.parse_args(argv)
    if args.smoke:
        args.layers, args.seq_len, args.prefill_len, args.decode_len = 2, 512, 64, 16
        args.new, args.moe_tokens, args.iters, args.warmup = 4, 256, 2, 1
    return args


# ----------------------------------------------------------------------------------------------------------
# Models with the same random weights


def build(make, dtype, device):
    """make() built on the device in dtype, weights as Qwen3VL.init_weights draws them (N(0, 0.02), norms 1,
    biases 0) but drawn there: the CPU generators of init_weights take minutes for 8B parameters."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            m = make()
    finally:
        torch.set_default_dtype(default)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0, 0.02)
    return m


def hf_format():
    """Our checkpoint format ("v4" / "v5", config.HF_FORMATS) that the installed transformers reads."""
    import transformers
    return "v5" if int(transformers.__version__.split(".")[0]) >= 5 else "v4"


def reference_attention():
    from transformers.utils import is_flash_attn_2_available
    return "flash_attention_2" if is_flash_attn_2_available() else "sdpa"


def reference_of(model, attn):
    """The reference's Qwen3VLForConditionalGeneration holding our weights, exported by our checkpoint code."""
    from transformers import Qwen3VLConfig as HFConfig
    from transformers import Qwen3VLForConditionalGeneration
    fmt = hf_format()
    dtype = model.lm_head.weight.dtype
    with torch.device(model.lm_head.weight.device):
        ref = Qwen3VLForConditionalGeneration._from_config(HFConfig.from_dict(model.cfg.to_hf_dict(fmt)),
                                                           attn_implementation=attn, dtype=dtype)
    # tied embeddings: the checkpoint has no lm_head.weight (the reference ties it to the embedding)
    ref.load_state_dict(model._to_hf_state_dict(HF_EXPERT_LAYOUT[fmt]), strict=not model.cfg.tie_word_embeddings)
    return ref


# ----------------------------------------------------------------------------------------------------------
# Timing


class Timer:
    def __init__(self, device, iters, warmup):
        self.gpu, self.iters, self.warmup = device.type == "cuda", iters, warmup

    def sync(self):
        if self.gpu:
            torch.cuda.synchronize()

    def __call__(self, fn):
        """(median seconds per call of fn over the timed iterations, the last call's return value)."""
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.iters):
            self.sync()
            t0 = time.perf_counter()
            out = fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times), out


class TokenClock:
    """Host time of each generated token: our on_token callback, and a transformers streamer (whose put() gets the
    prompt first, then each token)."""

    def __init__(self, gpu):
        self.gpu, self.times = gpu, []

    def __call__(self, _tokens):
        if self.gpu:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    put = __call__

    def end(self):
        pass

    def step_seconds(self, skip=0):
        t = self.times[skip:]
        return (t[-1] - t[0]) / (len(t) - 1)


# ----------------------------------------------------------------------------------------------------------
# 1. Training step on packed rows (ours) and padded batches (the reference)


def samples(cfg, seq_len, grids, text_len, seed=0):
    """Image-text samples "text, <|vision_start|> image <|vision_end|>, text" (grid drawn from `grids`, text lengths
    from `text_len`) until the next would overflow a row of seq_len: train.Packer's sample dicts (ids, labels on the
    text, positions [3, L], pixels [t*h*w, 1536] and grid)."""
    g = torch.Generator().manual_seed(seed)
    m2 = cfg.vision.spatial_merge_size ** 2
    patch_dim = cfg.vision.in_channels * cfg.vision.temporal_patch_size * cfg.vision.patch_size ** 2

    def text():
        n = int(torch.randint(*text_len, (1,), generator=g))
        return torch.randint(0, cfg.image_token_id - 8, (n,), generator=g)

    out, n = [], 0
    while True:
        t, h, w = grids[int(torch.randint(len(grids), (1,), generator=g))]
        image = torch.tensor([cfg.vision_start_token_id] + [cfg.image_token_id] * (t * h * w // m2)
                             + [cfg.vision_end_token_id])
        ids = torch.cat([text(), image, text()])
        if n + len(ids) > seq_len:
            return out
        grid = torch.tensor([[t, h, w]])
        pos, _ = rope_index(ids[None], None, grid, None, image_token_id=cfg.image_token_id,
                            video_token_id=cfg.video_token_id, spatial_merge_size=cfg.vision.spatial_merge_size)
        labels = ids.masked_fill(ids == cfg.image_token_id, -100)
        labels[0] = -100
        out.append(dict(ids=ids, labels=labels, pos=pos[:, 0], pv=torch.randn(t * h * w, patch_dim, generator=g),
                        ig=grid, pvv=None, vg=None))
        n += len(ids)


def padded_batches(items, seq_len, pad_id, image_token_id):
    """The samples in order, as many per batch as fit seq_len padded tokens: the reference's kwargs per batch
    (input_ids and labels right-padded, attention_mask, pixel_values, image_grid_thw; for transformers 5 also
    mm_token_type_ids, 1 on image placeholders and 0 elsewhere, as its processor returns them)."""
    groups = [[]]
    for s in items:
        longest = max([len(s["ids"])] + [len(x["ids"]) for x in groups[-1]])
        if groups[-1] and (len(groups[-1]) + 1) * longest > seq_len:
            groups.append([])
        groups[-1].append(s)
    batches = []
    for group in groups:
        L = max(len(s["ids"]) for s in group)
        pad = lambda t, value: F.pad(t, (0, L - len(t)), value=value)             # noqa: E731
        batches.append(dict(input_ids=torch.stack([pad(s["ids"], pad_id) for s in group]),          # [b, L]
                            attention_mask=torch.stack([pad(torch.ones_like(s["ids"]), 0) for s in group]),
                            labels=torch.stack([pad(s["labels"], -100) for s in group]),
                            pixel_values=torch.cat([s["pv"] for s in group]),
                            image_grid_thw=torch.cat([s["ig"] for s in group])))
        if hf_format() == "v5":
            batches[-1]["mm_token_type_ids"] = (batches[-1]["input_ids"] == image_token_id).long()
    return batches


def train_rows(args, device, dtype, timer, attn):
    """Rows 1 and 2 (those of args.rows), on one pair of models."""
    if args.smoke:
        cfg = smoke_config()
        grids, text_len = [(1, 4, 4), (1, 4, 8), (1, 8, 4), (1, 8, 8)], (4, 32)
        vit_grids = [[1, 4, 6], [1, 8, 4], [1, 4, 4], [1, 2, 10]]
    else:
        cfg = Qwen3VLConfig.from_preset("qwen3-vl-8b", text=dict(num_hidden_layers=args.layers))
        grids = [(1, 16, 16), (1, 24, 32), (1, 32, 32), (1, 28, 40), (1, 48, 20), (1, 12, 60), (1, 40, 40),
                 (1, 64, 48)]
        text_len = (32, 256)
        vit_grids = [[1, 28, 28]] * 8 + [[1, 16, 16], [1, 24, 40], [1, 32, 32], [1, 56, 20], [1, 12, 64],
                                         [1, 40, 40], [1, 8, 8], [1, 20, 36]]
    shape = "smoke" if args.smoke else "8B"
    model = build(lambda: Qwen3VL(cfg), dtype, device).train()
    model.attn_impl = model.visual.attn_impl = "flex"                     # what train.py runs on a GPU
    ref = reference_of(model, attn).train()
    rows = []
    if "train" in args.rows:
        rows.append(attempt("train", lambda: train_row(args, model, ref, grids, text_len, shape, device, dtype,
                                                       timer)))
    if "vit" in args.rows:
        rows.append(attempt("vit", lambda: vit_row(model.visual, ref.model.visual, vit_grids, shape, device, dtype,
                                                   timer)))
    return rows


def train_row(args, model, ref, grids, text_len, shape, device, dtype, timer):
    cfg = model.cfg
    pad_id = PAD_ID if PAD_ID < cfg.text.vocab_size else 0
    items = samples(cfg, args.seq_len, grids, text_len)
    batch = collate([items], args.seq_len, pad_id)
    labels = batch.pop("labels").to(device)
    kw = {k: batch[k].to(device) for k in ("input_ids", "document_ids", "position_ids", "image_grid_thw")}
    kw["pixel_values"] = batch["pixel_values"].to(device, dtype)
    useful = sum(len(s["ids"]) for s in items)
    targets = int((labels[:, 1:] != -100).sum())
    visual = int((kw["input_ids"] == cfg.image_token_id).sum()) / args.seq_len
    ref_batches = [{k: v.to(device, dtype) if k == "pixel_values" else v.to(device) for k, v in b.items()}
                   for b in padded_batches(items, args.seq_len, pad_id, cfg.image_token_id)]
    padded = sum(b["input_ids"].numel() for b in ref_batches)

    def ours_step():
        _, loss = model(**kw, labels=labels, loss_reduction="sum", return_hidden=True)   # train.py's call
        (loss / targets).backward()
        model.zero_grad(set_to_none=True)
        return loss.item() / targets

    def ref_step():
        total = 0.0
        for b in ref_batches:            # gradient accumulation: each batch's mean loss, weighted by its targets
            n = int((b["labels"][:, 1:] != -100).sum())
            loss = ref(**b).loss
            (loss * n / targets).backward()
            total += loss.item() * n / targets
        ref.zero_grad(set_to_none=True)
        return total

    t_ours, loss_ours = timer(ours_step)
    t_ref, loss_ref = timer(ref_step)
    mfu = None                                                           # against a GPU's peak only
    if device.type == "cuda":
        mfu = model_flops(cfg, flop_counts(model), kw["input_ids"].numel(), document_lengths(kw["document_ids"].cpu()),
                          frame_sizes(kw)) / t_ours / PEAK_FLOPS
    mfu_note = "no MFU on the CPU" if mfu is None else f"MFU {100 * mfu:.1f}%"
    return row("train", f"{shape} shape, {cfg.text.num_hidden_layers} layers: {len(items)} samples, {useful} useful "
                        f"tokens ({visual:.0%} visual)", useful / t_ours, useful / t_ref, "useful tok/s",
               TARGETS["train"],
               f"ours 1 x {args.seq_len} packed, {mfu_note} (target >= {TARGETS['train MFU']:.0%}); reference "
               f"{len(ref_batches)} padded batches, {padded} tokens ({useful / padded:.0%} useful); loss gap "
               f"{abs(loss_ours - loss_ref) / loss_ref:.1e}",
               extra=dict(mfu=mfu, mfu_met=mfu is not None and mfu >= TARGETS["train MFU"], ms_ours=1e3 * t_ours,
                          ms_ref=1e3 * t_ref))


def vit_row(ours, ref, grids, shape, device, dtype, timer):
    grid = torch.tensor(grids, device=device)
    N = int(grid.prod(-1).sum())
    patch_dim = ours.patch_embed.proj.in_features
    pixels = torch.randn(N, patch_dim, device=device, dtype=dtype, generator=torch.Generator(device).manual_seed(0))

    def step(module, run):
        def fn():
            tokens, deepstack = run()
            loss = tokens.float().square().mean() + sum(d.float().square().mean() for d in deepstack)
            loss.backward()
            module.zero_grad(set_to_none=True)
            return tokens.detach().float()
        return fn

    def ref_run():
        out = ref(pixels, grid_thw=grid)
        return out if isinstance(out, tuple) else (out.pooler_output, out.deepstack_features)   # 4.57: a tuple

    t_ours, y_ours = timer(step(ours, lambda: ours(pixels, grid)))
    t_ref, y_ref = timer(step(ref, ref_run))
    gap = ((y_ours - y_ref).norm() / y_ref.norm()).item()
    return row("vit", f"{shape} ViT + mergers: {len(grids)} images of mixed sizes, {N} patches", N / t_ours, N / t_ref,
               "patches/s", TARGETS["vit"], f"ours packed (FlexAttention); tokens gap {gap:.1e}",
               extra=dict(ms_ours=1e3 * t_ours, ms_ref=1e3 * t_ref))


# ----------------------------------------------------------------------------------------------------------
# 3. Prefill and decode


def generate_rows(args, device, dtype, timer, attn):
    gpu = device.type == "cuda"
    cfg = smoke_config() if args.smoke else Qwen3VLConfig.from_preset("qwen3-vl-8b")
    model = build(lambda: Qwen3VL(cfg), dtype, device).eval()
    ref = reference_of(model, attn).eval()
    if gpu:
        model.fuse_projections()                                # as `sample.py --compile`
    t = cfg.text
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                       if n.startswith(("language_model.layers", "language_model.norm", "lm_head")))
    kv_per_slot = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * model.lm_head.weight.element_size()
    vocab = min(PAD_ID, t.vocab_size - 8)
    shape = "smoke" if args.smoke else "8B"
    path = "CUDA graph, fused q/k/v and gate/up" if gpu else "eager"
    g = torch.Generator().manual_seed(0)
    rows = []

    def prefill():
        ids = torch.randint(0, vocab, (1, args.prefill_len), generator=g).to(device)
        t_ours, _ = timer(lambda: generate(model, ids, max_new_tokens=1, temperature=0.0, eos_ids=()))
        t_ref, _ = timer(lambda: ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1,
                                              do_sample=False, pad_token_id=0))
        return row("prefill", f"{shape}, batch 1, {args.prefill_len}-token prompt (time to the first token)",
                   args.prefill_len / t_ours, args.prefill_len / t_ref, "prompt tok/s", None,
                   "ours: generate's prefill; reference: generate, default (dynamic) cache",
                   extra=dict(ms_ours=1e3 * t_ours, ms_ref=1e3 * t_ref))
    rows.append(attempt("prefill", prefill))

    def decode(B):
        ids = torch.randint(0, vocab, (B, args.decode_len), generator=g).to(device)
        kv_bytes = kv_per_slot * B * (args.decode_len + args.new / 2)          # filled slots, on average

        def ours():
            clock = TokenClock(gpu)
            out = generate(model, ids, max_new_tokens=args.new, temperature=0.0, eos_ids=(), cuda_graph=gpu,
                           on_token=clock)
            return out, clock.step_seconds()

        def theirs(cache):
            clock = TokenClock(gpu)
            extra = dict(cache_implementation="static") if cache == "static" else {}
            out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                               min_new_tokens=args.new, do_sample=False, pad_token_id=0, streamer=clock, **extra)
            return out[:, args.decode_len:], clock.step_seconds(skip=1)          # times[0]: the prompt

        ours()                                                  # compiles and captures (the same shapes)
        out_ours, s_ours = ours()
        how = "static cache"
        try:
            theirs("static")
            out_ref, s_ref = theirs("static")
            how += ", compiled by generate (torch.compile)" if getattr(ref, "_compiled_call", None) is not None \
                else ", not compiled"
        except Exception as e:                                  # noqa: BLE001  the reference's default instead
            how = f"default cache (static failed: {type(e).__name__}: {first_line(e)})"
            theirs("default")
            out_ref, s_ref = theirs("default")
        same = int((out_ours == out_ref).all(0).long().cumprod(0).sum())
        bw_ours, bw_ref = (weight_bytes + kv_bytes) / s_ours, (weight_bytes + kv_bytes) / s_ref
        target = TARGETS["decode b1 HBM"] if B == 1 else TARGETS["decode b32"]
        hbm = (f"ours {100 * bw_ours / HBM_BYTES_PER_S:.1f}% of HBM ({bw_ours / 1e12:.2f} TB/s), reference "
               f"{100 * bw_ref / HBM_BYTES_PER_S:.1f}%" if gpu else "no HBM figure on the CPU")
        note = (f"{hbm}; ours: {path}; reference: {how}; "
                f"greedy tokens equal for the first {same} of {args.new}")
        extra = dict(hbm_ours=bw_ours / HBM_BYTES_PER_S, hbm_ref=bw_ref / HBM_BYTES_PER_S, ms_ours=1e3 * s_ours,
                     ms_ref=1e3 * s_ref, reference=how)
        if B == 1:                   # the target is a share of the bandwidth, not a ratio
            extra["hbm_met"] = bw_ours / HBM_BYTES_PER_S >= target
            target = None
        return row(f"decode b{B}", f"{shape} decode, batch {B}, {args.decode_len}-token prompt, {args.new} new tokens",
                   B / s_ours, B / s_ref, "tok/s", target, note, extra=extra)
    for B in (1, 32):
        rows.append(attempt(f"decode b{B}", lambda: decode(B)))
    return rows


# ----------------------------------------------------------------------------------------------------------
# 4. MoE layer


def moe_row(args, device, dtype, timer):
    from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeTextConfig
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextSparseMoeBlock
    H, E, k, I = (64, 8, 2, 32) if args.smoke else (2048, 128, 8, 768)
    ours = build(lambda: SparseMoeBlock(TextConfig(hidden_size=H, num_experts=E, num_experts_per_tok=k,
                                                   moe_intermediate_size=I)), dtype, device)
    rcfg = Qwen3VLMoeTextConfig(hidden_size=H, num_experts=E, num_experts_per_tok=k, moe_intermediate_size=I)
    impl = "eager"
    if hf_format() == "v5":                  # transformers 5 chooses among implementations of the experts
        impl = "grouped_mm"
        rcfg._experts_implementation = impl
    with torch.device(device):
        ref = Qwen3VLMoeTextSparseMoeBlock(rcfg).to(dtype)
    experts = experts_to_checkpoint(ours.experts.gate_up_proj, ours.experts.down_proj, HF_EXPERT_LAYOUT[hf_format()])
    ref.load_state_dict({"gate.weight": ours.gate.weight, **{f"experts.{n}": w for n, w in experts.items()}})
    g = torch.Generator(device).manual_seed(1)
    x = torch.randn(1, args.moe_tokens, H, device=device, dtype=dtype, generator=g).requires_grad_()
    dy = torch.randn(x.shape, device=device, dtype=dtype, generator=g)

    def step(block, output):
        def fn():
            y = output(block(x))
            y.backward(dy)
            block.zero_grad(set_to_none=True)
            x.grad = None
            return y.detach().float()
        return fn

    ours_step = step(ours, lambda out: out[0])
    t_ours, y_ours = timer(ours_step)
    t_ref, y_ref = timer(step(ref, lambda out: out[0] if isinstance(out, tuple) else out))   # 4.57: a tuple
    gap = ((y_ours - y_ref).norm() / y_ref.norm()).item()
    sync = ""
    if device.type == "cuda":                # the grouped path promises no host sync (moe.py): any sync raises here
        torch.cuda.set_sync_debug_mode("error")
        try:
            ours_step()
            sync = "; ours: no host sync in forward + backward"
        except RuntimeError as e:
            sync = f"; ours made a host sync: {first_line(e)}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return row("moe", f"MoE layer H {H}, {E} experts, top-{k}, I {I}: {args.moe_tokens} tokens, train",
               args.moe_tokens / t_ours, args.moe_tokens / t_ref, "tok/s", TARGETS["moe"],
               f"ours grouped (torch._grouped_mm); reference experts_implementation={impl!r}; output gap {gap:.1e}"
               + sync, extra=dict(ms_ours=1e3 * t_ours, ms_ref=1e3 * t_ref))


# ----------------------------------------------------------------------------------------------------------
# The table


def row(name, what, ours, ref, unit, target, note, extra=None):
    """One line of the table: ours and the reference in `unit` (higher is better), ratio ours / reference."""
    ratio = ours / ref
    return dict(row=name, what=what, ours=ours, ref=ref, unit=unit, ratio=ratio, target=target,
                met=None if target is None else ratio >= target, note=note, **(extra or {}))


def first_line(e):
    return str(e).strip().splitlines()[0][:160] if str(e).strip() else ""


def attempt(name, fn):
    """fn() -> a row, or a row that holds the error: one failing row must not end the run."""
    try:
        return fn()
    except Exception as e:                                            # noqa: BLE001
        traceback.print_exc()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return dict(row=name, what="", ours=None, ref=None, unit="", ratio=None, target=None, met=None,
                    note=f"FAILED: {type(e).__name__}: {first_line(e)}")


def markdown(rows, header):
    num = lambda v: "" if v is None else f"{v:,.0f}" if v >= 100 else f"{v:.3g}"      # noqa: E731
    lines = [header, "", "| row | what | ours | reference | unit | ours / ref | target | met | notes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        target, met = "", ""
        if r["target"] is not None:
            target, met = f">= {r['target']}x", "yes" if r["met"] else "no"
        if "mfu_met" in r:
            target = f"{target}; MFU >= {TARGETS['train MFU']:.0%}"
            met = f"{met}; MFU {'yes' if r['mfu_met'] else 'no'}"
        if "hbm_met" in r:
            target, met = f"HBM >= {TARGETS['decode b1 HBM']:.0%}", "yes" if r["hbm_met"] else "no"
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append(f"| {r['row']} | {r['what']} | {num(r['ours'])} | {num(r['ref'])} | {r['unit']} | {ratio} | "
                     f"{target} | {met} | {r['note']} |")
    return "\n".join(lines)


def smoke_config():
    return Qwen3VLConfig.from_preset("toy-cpu", text=dict(num_hidden_layers=2, vocab_size=1024), image_token_id=1020,
                                     video_token_id=1021, vision_start_token_id=1022, vision_end_token_id=1023,
                                     vision=dict(depth=2, deepstack_visual_indexes=[0, 1]))


def main(argv=None):
    args = parse_args(argv)
    import transformers
    if args.smoke:
        # torch refuses backward through FlexAttention on the CPU (a device guard); its eager implementation, a dense
        # score matrix, differentiates exactly (tests/conftest.py lifts the guard the same way)
        import warnings
        import torch.nn.attention.flex_attention as fa
        fa._validate_device = lambda *tensors: None
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        device, dtype = torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run with --smoke on the CPU")
        device, dtype = torch.device("cuda"), torch.bfloat16
    attn = reference_attention()
    timer = Timer(device, args.iters, args.warmup)
    header = (f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU (smoke)'}, torch {torch.__version__},"
              f" transformers {transformers.__version__} (attention {attn!r}), {str(dtype).removeprefix('torch.')}, "
              f"median of {args.iters} after {args.warmup}; higher is better everywhere")
    print(header, flush=True)
    rows, t0 = [], time.perf_counter()
    parts = [("train", lambda: train_rows(args, device, dtype, timer, attn)),
             ("decode", lambda: generate_rows(args, device, dtype, timer, attn)),
             ("moe", lambda: [moe_row(args, device, dtype, timer)])]
    for name, fn in parts:
        if name not in args.rows and not (name == "train" and "vit" in args.rows):
            continue
        t = time.perf_counter()
        got = attempt(name, fn)                              # building the models may fail too
        got = got if isinstance(got, list) else [got]
        rows += got
        for r in got:
            print(f"{r['row']}: ours {r['ours']}, reference {r['ref']} {r['unit']}: {r['note']}", flush=True)
        print(f"[{name}: {time.perf_counter() - t:.0f} s]", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    table = markdown(rows, header + f"; {time.perf_counter() - t0:.0f} s in all")
    print(table)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(table + "\n")
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump(dict(header=header, args=vars(args), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
