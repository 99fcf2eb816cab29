"""
Speed of the vision encoder (vision.py) against the reference's `Qwen3VLVisionModel` (transformers 4.57.6, SDPA)
on the same weights and pixels: one training step of the ViT and its mergers, forward + backward.

    python bench/vision.py                   # CPU: the toy-cpu ViT on one toy training step's pixels (8 images, 2 videos)
    python bench/vision.py --device cuda     # GPU: the 8B model's ViT, bf16, 16 images of 448 x 448 and 2 videos

Both run block-diagonal attention over a packed batch: ours as one dense batch per distinct frame-group size, the
reference as one attention call per frame group (a Python loop over `cu_seqlens` chunks).
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repo root
from model import Qwen3VLConfig  # noqa: E402
from vision import VisionEncoder  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--device", default="cpu", help="cpu or cuda")
parser.add_argument("--iters", type=int, default=10, help="timed steps per measurement (the median is reported)")
parser.add_argument("--threads", type=int, help="CPU threads (on a busy machine 1 gives steadier numbers)")
args = parser.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)
gpu = args.device.startswith("cuda")
device, dtype = torch.device(args.device), (torch.bfloat16 if gpu else torch.float32)

# the ViT and the packed batch: (t, h, w) in patches per image/video
if gpu:
    vcfg = Qwen3VLConfig.from_preset("qwen3-vl-8b").vision
    grids = [[1, 28, 28]] * 16 + [[8, 16, 24]] * 2
else:
    vcfg = Qwen3VLConfig.from_preset("toy-cpu").vision
    grids = [[1, 6, 6]] * 8 + [[6, 6, 6]] * 2
grid = torch.tensor(grids, device=device)
N = int(grid.prod(-1).sum())
pixels = torch.randn(N, 3 * 2 * 16 * 16, device=device, dtype=dtype)

torch.manual_seed(0)
ours = VisionEncoder(vcfg).to(device=device, dtype=dtype)
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig  # noqa: E402
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel  # noqa: E402
rcfg = Qwen3VLVisionConfig(depth=vcfg.depth, hidden_size=vcfg.hidden_size, intermediate_size=vcfg.intermediate_size,
                           num_heads=vcfg.num_heads, out_hidden_size=vcfg.out_hidden_size,
                           num_position_embeddings=vcfg.num_position_embeddings,
                           deepstack_visual_indexes=list(vcfg.deepstack_visual_indexes))
rcfg._attn_implementation = "sdpa"
reference = Qwen3VLVisionModel(rcfg).to(device=device, dtype=dtype)
mine = ours.state_dict()                  # same names; their Conv3d patch embedding is our Linear, flattened
ours.load_state_dict({k: v.reshape(mine[k].shape) for k, v in reference.state_dict().items()})


def step(model, run):
    tokens, deepstack = run()
    (tokens.float().square().mean() + sum(d.float().square().mean() for d in deepstack)).backward()
    model.zero_grad(set_to_none=True)


def timed(model, run):
    for _ in range(2):
        step(model, run)
    times = []
    for _ in range(args.iters):
        if gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(model, run)
        if gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


with torch.no_grad():
    diff = (ours(pixels, grid)[0].float() - reference(pixels, grid_thw=grid)[0].float()).abs().max().item()
t_ours = timed(ours, lambda: ours(pixels, grid))
t_ref = timed(reference, lambda: reference(pixels, grid_thw=grid))
print(f"ViT depth {vcfg.depth} x {vcfg.hidden_size}, {len(grids)} images/videos, {N} patches, {dtype}, {device.type}; "
      f"max |ours - reference| on the tokens {diff:.1e}")
print(f"forward + backward: ours {t_ours:.1f} ms, reference {t_ref:.1f} ms ({t_ref / t_ours:.2f}x)")
