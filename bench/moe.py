"""
Speed of the MoE block's execution paths (moe.py) against the reference's `Qwen3VLMoeTextSparseMoeBlock`
(transformers 4.57.6) on the same weights and tokens: one training step, forward + backward.

    python bench/moe.py                      # CPU, a reduced shape in float32
    python bench/moe.py --device cuda        # GPU: the 30B-A3B layer (H=2048, E=128, k=8, I=768), bf16, 8k and 16k tokens

The reference runs the path it takes for training (module.train(): a loop over the experts hit, `index_add_`);
its eval() path (every expert on every token, a dense bmm) is timed for the forward alone. On CUDA the script first
checks that the grouped path makes no host sync (forward and backward), replays its forward from a CUDA graph, and,
with --compile, times it under torch.compile(fullgraph=True) too.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repo root: moe.py, model.py
from config import TextConfig  # noqa: E402
from moe import SparseMoeBlock  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--device", default="cpu", help="cpu or cuda")
parser.add_argument("--tokens", type=int, nargs="+", help="tokens per step (default: 2048 on CPU, 8192 16384 on GPU)")
parser.add_argument("--dtype", help="float32 or bfloat16 (default: float32 on CPU, bfloat16 on GPU)")
parser.add_argument("--hidden", type=int, help="H (default: 256 on CPU, 2048 on GPU)")
parser.add_argument("--experts", type=int, help="E (default: 32 on CPU, 128 on GPU)")
parser.add_argument("--top-k", type=int, help="k (default: 4 on CPU, 8 on GPU)")
parser.add_argument("--moe-intermediate", type=int, help="I (default: 128 on CPU, 768 on GPU)")
parser.add_argument("--iters", type=int, default=10, help="timed steps per measurement (the median is reported)")
parser.add_argument("--compile", action="store_true", help="also time the grouped path under torch.compile")
parser.add_argument("--no-reference", action="store_true", help="skip the transformers reference")
parser.add_argument("--threads", type=int, help="CPU threads (on a busy machine 1 gives steadier numbers)")
args = parser.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)

gpu = args.device.startswith("cuda")
device = torch.device(args.device)
dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
tokens = args.tokens or ([8192, 16384] if gpu else [2048])
H, E = args.hidden or (2048 if gpu else 256), args.experts or (128 if gpu else 32)
k, I = args.top_k or (8 if gpu else 4), args.moe_intermediate or (768 if gpu else 128)

# ----------------------------------------------------------------------------------------------------------
# The blocks, with the same weights


torch.manual_seed(0)
cfg = TextConfig(hidden_size=H, num_experts=E, num_experts_per_tok=k, moe_intermediate_size=I)
ours = SparseMoeBlock(cfg).to(device=device, dtype=dtype)
reference = None
if not args.no_reference:
    try:
        import transformers
        from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeTextConfig
        from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextSparseMoeBlock
        if transformers.__version__ != "4.57.6":
            print(f"note: transformers {transformers.__version__} is not the pinned reference 4.57.6")
        reference = Qwen3VLMoeTextSparseMoeBlock(Qwen3VLMoeTextConfig(
            hidden_size=H, num_experts=E, num_experts_per_tok=k, moe_intermediate_size=I))
        reference.load_state_dict(ours.state_dict())                   # the same keys: gate, experts.*
        reference.to(device=device, dtype=dtype)
    except ImportError as e:
        print(f"no reference: {e}")
print(f"device {torch.cuda.get_device_name(device) if gpu else 'cpu'} ({torch.get_num_threads()} threads), "
      f"torch {torch.__version__}, {dtype}; block H={H} E={E} k={k} I={I}")


def sync():
    if gpu:
        torch.cuda.synchronize(device)


def train_step(block, x, dy):
    """Forward and backward; the gradients are dropped (set to None) before each step, as an optimizer would."""
    block.zero_grad(set_to_none=True)
    x.grad = None
    y, _ = block(x)
    y.backward(dy)


def forward(block, x):
    with torch.no_grad():
        return block(x)[0]


def timed(fn, *a):
    """Median milliseconds of `fn(*a)` over args.iters calls after 3 warm-up calls."""
    for _ in range(3):
        fn(*a)
    times = []
    for _ in range(args.iters):
        sync()
        t = time.perf_counter()
        fn(*a)
        sync()
        times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


# ----------------------------------------------------------------------------------------------------------
# Correctness and the no-host-sync property of the grouped path (CUDA)


g = torch.Generator(device=device).manual_seed(1)
x = torch.randn(1, tokens[0], H, device=device, dtype=dtype, generator=g)
ours.impl = "loop"
y_loop = forward(ours, x)
ours.impl = "grouped"
y_grouped = forward(ours, x)
rel = ((y_grouped.float() - y_loop.float()).norm() / y_loop.float().norm()).item()
print(f"grouped vs loop: relative L2 difference {rel:.2e}")
if reference is not None:
    y_ref = forward(reference.train(), x)
    print(f"grouped vs reference (train path): relative L2 difference "
          f"{((y_grouped.float() - y_ref.float()).norm() / y_ref.float().norm()).item():.2e}")
    small = x[:, :37]                                    # few tokens: experts without any, empty groups in backward
    grads = []
    for block in (ours, reference.train()):              # ours.impl is "grouped"
        xs = small.detach().clone().requires_grad_()
        block.zero_grad(set_to_none=True)
        block(xs)[0].float().square().sum().backward()
        grads.append([xs.grad.float()] + [p.grad.float() for p in block.parameters()])
    worst = max(((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(*grads))
    print(f"gradients, 37 tokens, grouped vs reference: worst relative L2 difference {worst:.2e}")
if gpu:
    xg = x.detach().clone().requires_grad_()
    dy = torch.randn_like(x)
    train_step(ours, xg, dy)
    sync()
    torch.cuda.set_sync_debug_mode("error")                 # any device-to-host copy or sync raises
    try:
        train_step(ours, xg, dy)
        print("grouped path, forward + backward: no host sync")
    except RuntimeError as e:
        print(f"grouped path made a host sync: {e}")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    try:
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            forward(ours, x)                                # warm up off the capture stream
        torch.cuda.current_stream().wait_stream(stream)
        with torch.no_grad(), torch.cuda.graph(graph):
            y_static, _ = ours(x)
        graph.replay()
        sync()
        print(f"grouped forward replayed from a CUDA graph: max |diff| {(y_static - y_grouped).abs().max().item():.1e}")
    except RuntimeError as e:
        print(f"CUDA graph capture failed: {e}")

# ----------------------------------------------------------------------------------------------------------
# Timings


def report(title, ms):
    print(title)
    for name, t in ms.items():
        print(f"  {name:24s} {t:9.2f} ms   {flops / t / 1e9:8.3f} TFLOP/s of expert matmuls   "
              f"{t / ms['grouped']:5.2f}x the grouped time")


steps = {}
for T in tokens:
    x = torch.randn(1, T, H, device=device, dtype=dtype, generator=g).requires_grad_()
    dy = torch.randn_like(x)
    flops = 3 * 2 * T * k * 3 * H * I                      # expert matmuls of forward + backward (backward = 2x)
    ms = {}
    for impl in ("grouped", "loop"):
        ours.impl = impl
        ms[impl] = timed(train_step, ours, x, dy)
    ours.impl = "grouped"
    if reference is not None:
        ms["reference (train path)"] = timed(train_step, reference.train(), x, dy)
    steps[T] = ms
    report(f"\n{T} tokens, training step (forward + backward), median of {args.iters}:", ms)
    flops = flops // 3                                     # the forward alone
    fwd = {"grouped": timed(forward, ours, x)}
    if reference is not None and (gpu or T <= 4096):      # eval path: every expert on every token
        fwd["reference (eval path)"] = timed(forward, reference.eval(), x)
    report(f"{T} tokens, forward only (inference):", fwd)

if args.compile:                                           # after the eager numbers, which it cannot lose then
    compiled = torch.compile(ours, fullgraph=True)
    for T in tokens[-1:]:                                  # one shape: one compilation
        x = torch.randn(1, T, H, device=device, dtype=dtype, generator=g).requires_grad_()
        t = time.perf_counter()
        train_step(compiled, x, torch.randn_like(x))
        sync()
        print(f"\ntorch.compile(fullgraph=True), {T} tokens: first training step (compiling) {time.perf_counter() - t:.0f} s")
        flops = 3 * 2 * T * k * 3 * H * I
        ms = {"grouped": steps[T]["grouped"], "grouped, compiled": timed(train_step, compiled, x, torch.randn_like(x))}
        if reference is not None:
            ms["reference (train path)"] = steps[T]["reference (train path)"]
        report(f"{T} tokens, training step, compiled:", ms)
