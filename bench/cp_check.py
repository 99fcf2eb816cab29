"""
Context parallelism (train.py --cp) on GPUs: one packed row of toy-world samples (several documents, images) split
over 2 ranks by train.ContextParallel must give the loss and every gradient of the whole row on one rank, and each
rank must hold less memory. In fp32 (TF32 off), FlexAttention compiled, the CP block mask compiled, NCCL: the paths
tests/test_cp.py cannot take on the CPU. Both runs use the same weights; the gradients of the split run are summed
over the ranks (as FSDP's reduction does), the loss is the sum of the ranks' sums over the row's target count.

    torchrun --nproc_per_node 2 bench/cp_check.py                   # 2 GPUs: PASS/FAIL, peak memory per rank
    torchrun --nproc_per_node 2 bench/cp_check.py --seq_len 32768   # a longer row
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 bench/cp_check.py --smoke   # CPU (gloo), tiny: that it runs

The whole training loop is checked the same way by running train.py twice on the same rows and comparing the
logged losses: `torchrun --nproc_per_node 2 train.py --cp 2 ...` against `python train.py ...` (one GPU, bf16).
"""
import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repo root
import train  # noqa: E402
from data.toy import ToyData  # noqa: E402
from data.toyworld import ToyWorld  # noqa: E402
from model import Qwen3VL, Qwen3VLConfig  # noqa: E402
from processor import Processor  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--smoke", action="store_true", help="CPU (gloo), toy-cpu, a row of 256: that it all runs")
parser.add_argument("--preset", default="toy-gpu", help="model shape (toy-cpu with --smoke)")
parser.add_argument("--seq_len", type=int, default=8192, help="tokens in the row (a multiple of 128 x ranks)")
parser.add_argument("--tolerance", type=float, default=1e-4, help="largest relative difference that passes")
args = parser.parse_args()

dist.init_process_group("gloo" if args.smoke else "nccl")
rank, world = dist.get_rank(), dist.get_world_size()
if args.smoke:          # the CPU's guards (tests/test_cp.py): FlexAttention's backward, the compiled mask builder
    import torch.distributed.tensor.experimental._context_parallel._attention as cp_attention
    import torch.nn.attention.flex_attention as fa
    fa._validate_device = lambda *tensors: None
    cp_attention._compiled_create_block_mask = fa.create_block_mask
    device, preset, seq_len = torch.device("cpu"), "toy-cpu", 128 * world
else:
    device, preset, seq_len = torch.device("cuda", int(os.environ["LOCAL_RANK"])), args.preset, args.seq_len
    torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
mesh = init_device_mesh(device.type, (world,))

toy = ToyWorld(seed=0, image_size=96)
tok = Tokenizer.train(toy.text_corpus(1000), 400)
cfg = Qwen3VLConfig.from_preset(preset, text=dict(vocab_size=448), image_token_id=tok.image_token_id,
                                video_token_id=tok.video_token_id, vision_start_token_id=tok.vision_start_id,
                                vision_end_token_id=tok.vision_end_id)
torch.manual_seed(0)
model = Qwen3VL(cfg).to(device)
model.init_weights(seed=1)
model.attn_impl = "flex"
packer = train.Packer(ToyData(seed=0), Processor(tok, min_pixels=64 * 64 // 2, max_pixels=64 * 64 * 4), cfg)
batch = {k: v.to(device) for k, v in packer.batch([0], "pretrain", seq_len).items() if v is not None}
labels, real = batch.pop("labels"), batch.pop("real")
norm = float((labels[:, 1:] != -100).sum())
n_docs = len(batch["document_ids"][0][real[0].bool()].unique())


def step(context_parallel):
    """Loss (summed over the ranks' parts) and gradients (summed over the ranks) of the row, and peak memory."""
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _, loss = model(**batch, labels=labels, loss_reduction="sum", return_hidden=True,
                    context_parallel=context_parallel)
    (loss / norm).backward()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    loss = loss.detach() / norm
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    if context_parallel is not None:
        dist.all_reduce(loss)
        for g in grads.values():
            dist.all_reduce(g)
    return loss, grads, peak


step(None)                                                   # compile on the first call, untimed
loss_one, grads_one, peak_one = step(None)                   # the whole row on this rank
cp = train.ContextParallel(model, mesh)                      # from here every decoder attention is split
step(cp)
loss_cp, grads_cp, peak_cp = step(cp)
loss_gap = abs(loss_cp - loss_one).item() / abs(loss_one).item()
grad_gap, worst = max((((grads_cp[n] - g).abs().max() / g.abs().max().clamp_min(1e-30)).item(), n)
                      for n, g in grads_one.items())
if rank == 0:
    print(f"{preset}, one row of {seq_len} tokens ({n_docs} documents, {len(batch.get('image_grid_thw', []))} "
          f"images), {world} ranks, {device.type}")
    print(f"loss: whole row {loss_one.item():.6f}, split {loss_cp.item():.6f}, relative gap {loss_gap:.2e}")
    print(f"gradients: largest relative gap {grad_gap:.2e} ({worst})")
    if device.type == "cuda":
        print(f"peak memory per rank: whole row {peak_one:.2f} GiB, split over {world} {peak_cp:.2f} GiB")
    ok = loss_gap <= args.tolerance and grad_gap <= args.tolerance
    print(("PASS" if ok else "FAIL") + f" at a relative tolerance of {args.tolerance:g}")
dist.destroy_process_group()
