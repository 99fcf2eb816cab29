"""
Decode speed of sample.generate on a GPU, side by side with the reference's generate (transformers 4.57.6, used only
here and in tests): Qwen3-VL-8B shapes, random bf16 weights made on the GPU, greedy, batch 1 and 32.

- ours          sample.generate, eager (the readable path)
- ours-graph    sample.generate(cuda_graph=True) after model.fuse_projections() (what `sample.py --compile` runs):
                the decode step compiled and captured in a CUDA graph, q/k/v and gate/up each read as one matrix
- ours-graph-unfused   the same with the fused matrices set aside (the parts are views of them: same values)
- ours-sample   the same, sampling with Qwen3-VL's Instruct settings (penalties, top-k, top-p) instead of greedy
- hf            the reference's generate, default (dynamic cache, eager)
- hf-static     the reference's generate with cache_implementation="static" (it then compiles its forward
                with mode="reduce-overhead" by itself)

Decode tokens/s = batch x (new tokens - 1) / (time of the last token - time of the first), each token timed when it
reaches the host (our on_token callback, the reference's streamer): prefill, compilation and graph capture are out.
Bandwidth = bytes a decode step must read / step time: every weight the LLM uses once (all but the embedding table
and the vision tower) plus the keys and values it attends over (our whole preallocated cache; the reference's
static cache likewise; its dynamic cache only the filled part), against the H200's 4.8 TB/s.

    python bench/sample.py                                   # everything, batch 1 and 32
    python bench/sample.py --impl ours-graph,hf --batch 1
    python bench/sample.py --impl ours-graph --batch 1 --profile     # where a decode step's time goes

Measured on one H200 (torch 2.11, transformers 4.57.6; 128-token prompt, 128 new tokens), decode tokens/s and the
share of 4.8 TB/s that the bytes read per step make (one run, --profile; the B=32 unfused row is from the run before
fuse_projections existed):
    implementation             batch 1             batch 32
    ours-graph (fused)         187.4  (59.2%)      5558  (59.1%)
    ours-graph-unfused         169.7  (53.7%)      5115  (54.4%)
    ours-sample (Instruct)     166.1  (52.5%)      5165  (55.0%)
    ours (eager)                15.4  ( 4.9%)       422  ( 4.5%)
    hf (default)                 6.1  ( 1.9%)       310  ( 3.2%)
    hf-static (compiled)        59.7  (18.9%)      1573  (16.7%)
Where ours-graph's 5.3 ms per step go (--profile, batch 1): the weight products alone, in one CUDA graph, take 4.2 ms
(cuBLAS, 3.6 TB/s; unfused they took 4.9 ms: the thin k/v products reached only 1.6 TB/s); two of the four products
per layer still use split-K with a reduce kernel; then cuDNN attention, 8 us per layer (the memory-efficient kernel
takes no grouped-query heads with a mask here, the math one takes 45 us), and ~7 fused Triton kernels per layer
(norms, QK-norm + RoPE + cache write, SwiGLU); 510 kernels per step in all (735 unfused). Greedy tokens of random
bf16 weights agree with the unfused run for 16 of 128 tokens at batch 1 and all 128 at batch 32: the fused products
round differently in bf16 and random weights leave near-ties (fp32 tests: identical tokens).
"""
import argparse
import contextlib
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from compare import HBM_BYTES_PER_S, TokenClock, build, reference_attention, reference_of  # noqa: E402
from model import Qwen3VL, Qwen3VLConfig  # noqa: E402
from sample import CACHE_BLOCK, INSTRUCT, generate  # noqa: E402


@contextlib.contextmanager
def unfused(model):
    """Forward reads q/k/v and gate/up separately (as before fuse_projections) while inside."""
    saved = [(m, name, getattr(m, name)) for m in model.modules() for name in ("qkv_weight", "gate_up_weight")
             if hasattr(m, name)]
    for m, name, _ in saved:
        setattr(m, name, None)
    try:
        yield
    finally:
        for m, name, w in saved:
            setattr(m, name, w)


def run(impl, model, ref, ids, new):
    """-> (new tokens [B, new], decode seconds per step, KV bytes read per step)."""
    cfg = model.cfg.text
    B, S = ids.shape
    kv_per_slot = 2 * cfg.num_hidden_layers * B * cfg.num_key_value_heads * cfg.head_dim * 2    # k and v, bf16
    clock = TokenClock(gpu=True)
    if impl.startswith("ours"):
        sampling = dict(INSTRUCT, generator=torch.Generator(ids.device).manual_seed(0)) if impl == "ours-sample" \
            else dict(temperature=0.0)
        with unfused(model) if impl == "ours-graph-unfused" else contextlib.nullcontext():
            out = generate(model, ids, max_new_tokens=new, eos_ids=(), cuda_graph=impl != "ours", on_token=clock,
                           **sampling)
        slots = -(-(S + new) // CACHE_BLOCK) * CACHE_BLOCK if impl != "ours" else S + new
        times = clock.times
    else:
        extra = dict(cache_implementation="static") if impl == "hf-static" else {}
        out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, pad_token_id=151643, streamer=clock, **extra)
        out = out[:, S:]
        slots = S + new if impl == "hf-static" else S + new / 2          # the dynamic cache grows: on average
        times = clock.times[1:]                                        # [0] is the prompt
    return out, (times[-1] - times[0]) / (len(times) - 1), kv_per_slot * slots


def matmul_floor(model, B, reps=20):
    """ms per replay of a CUDA graph holding only a decode step's weight products (the matrices the forward reads:
    fused ones after fuse_projections, each LLM Linear otherwise, and the LM head)."""
    weights = [model.lm_head.weight]
    for layer in model.language_model.layers:
        a, m = layer.self_attn, layer.mlp
        weights += [a.qkv_weight] if a.qkv_weight is not None else [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]
        weights += [a.o_proj.weight, m.down_proj.weight]
        weights += [m.gate_up_weight] if m.gate_up_weight is not None else [m.gate_proj.weight, m.up_proj.weight]
    xs = {w.shape[1]: torch.randn(B, w.shape[1], dtype=torch.bfloat16, device="cuda") for w in weights}

    def products():
        for w in weights:
            torch.nn.functional.linear(xs[w.shape[1]], w)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        products()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        products()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def attention_microbench(model, B, T, reps=20):
    """us per call of one layer's decode attention (1 query per row, T cached keys, bool mask) per SDPA backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    c = model.cfg.text
    q = torch.randn(B, c.num_attention_heads, 1, c.head_dim, dtype=torch.bfloat16, device="cuda")
    k, v = (torch.randn(B, c.num_key_value_heads, T, c.head_dim, dtype=torch.bfloat16, device="cuda") for _ in "kv")
    mask = torch.arange(T, device="cuda")[None, None, None] < T // 2                       # [1, 1, 1, T]
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
        try:
            with sdpa_kernel(backend):
                def layers():
                    for _ in range(c.num_hidden_layers):
                        torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
                layers()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    layers()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            us = 1e3 * start.elapsed_time(end) / reps / c.num_hidden_layers
            print(f"decode attention B={B} T={T} {backend.name}: {us:.1f} us per layer", flush=True)
        except Exception as e:
            print(f"decode attention {backend.name}: {type(e).__name__}: {str(e)[:200]}", flush=True)


def profile_decode(model, ids, steps=10):
    """The GPU kernels of `steps` graph-replayed decode steps (ours-graph), by total time."""
    from torch.profiler import ProfilerActivity, profile
    prof, n = profile(activities=[ProfilerActivity.CUDA]), [0]

    def on_token(_tokens):
        n[0] += 1
        if n[0] == 2:
            torch.cuda.synchronize()
            prof.start()
        if n[0] == 2 + steps:
            torch.cuda.synchronize()
            prof.stop()
    generate(model, ids, max_new_tokens=steps + 4, temperature=0.0, eos_ids=(), cuda_graph=True, on_token=on_token)
    events = prof.key_averages()
    print(f"kernels per decode step: {sum(e.count for e in events) / steps:.0f}")
    print(events.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=80))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--impl", default="ours-graph-unfused,ours-graph,ours-sample,hf,ours,hf-static")
    p.add_argument("--batch", default="1,32")
    p.add_argument("--preset", default="qwen3-vl-8b")
    p.add_argument("--prompt_len", type=int, default=128)
    p.add_argument("--new", type=int, default=128, help="new tokens per row")
    p.add_argument("--profile", action="store_true", help="ours-graph at the first batch size: the products-only "
                   "floor of a decode step and its kernels")
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for bench_sample.json")
    args = p.parse_args()
    impls, batches = args.impl.split(","), [int(b) for b in args.batch.split(",")]

    t0 = time.perf_counter()
    model = build(lambda: Qwen3VL(Qwen3VLConfig.from_preset(args.preset)), torch.bfloat16, "cuda").eval()
    ref = reference_of(model, reference_attention()).eval() if any(i.startswith("hf") for i in impls) else None
    model.fuse_projections()                                           # as `sample.py --compile`
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                       if n.startswith(("language_model.layers", "language_model.norm", "lm_head")))
    print(f"{args.preset} random bf16 on {torch.cuda.get_device_name()}: built in {time.perf_counter() - t0:.0f} s; "
          f"a decode step reads {weight_bytes / 1e9:.2f} GB of weights; torch {torch.__version__}", flush=True)

    g = torch.Generator().manual_seed(0)
    rows, first = [], {}
    for B in batches:
        ids = torch.randint(0, min(151643, model.cfg.text.vocab_size), (B, args.prompt_len), generator=g).cuda()
        for impl in impls:
            t0 = time.perf_counter()
            try:
                run(impl, model, ref, ids, args.new if impl == "hf-static" else 8)  # warm-up: compiles (same shapes)
                warm = time.perf_counter() - t0
                out, step_s, kv_bytes = run(impl, model, ref, ids, args.new)
            except Exception as e:                       # report and go on with the next implementation
                print(f"{impl:12s} B={B:<3d} failed: {type(e).__name__}: {e}", flush=True)
                continue
            bw = (weight_bytes + kv_bytes) / step_s
            same = first.setdefault(B, out)
            agree = int((out == same).all(0).long().cumprod(0).sum()) if impl != "ours-sample" else None
            rows.append(dict(impl=impl, batch=B, tokens_per_s=B / step_s, ms_per_step=1e3 * step_s,
                             bandwidth_TBps=bw / 1e12, bandwidth_frac=bw / HBM_BYTES_PER_S, warmup_s=warm,
                             greedy_tokens_equal_to_first_impl=agree))
            r = rows[-1]
            print(f"{impl:12s} B={B:<3d} {r['tokens_per_s']:9.1f} tok/s {r['ms_per_step']:8.2f} ms/step "
                  f"{r['bandwidth_TBps']:5.2f} TB/s = {100 * r['bandwidth_frac']:5.1f}% of HBM  (warm-up {warm:.0f} s, "
                  f"greedy tokens equal to {impls[0]}'s for the first {agree})", flush=True)
            with open(os.path.join(args.out, "bench_sample.json"), "w") as f:
                json.dump(rows, f, indent=1)
            if args.profile and impl == "ours-graph" and B == batches[0]:
                try:
                    floor = matmul_floor(model, B)
                    print(f"the weight products alone, in one CUDA graph: {floor:.2f} ms = "
                          f"{weight_bytes / floor / 1e9:.2f} TB/s", flush=True)
                    profile_decode(model, ids)
                    attention_microbench(model, B, -(-(args.prompt_len + args.new) // CACHE_BLOCK) * CACHE_BLOCK)
                except Exception as e:
                    print(f"profile failed: {type(e).__name__}: {e}", flush=True)


if __name__ == "__main__":
    main()
