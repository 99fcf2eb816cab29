"""
Train Qwen3-VL: the paper's recipe as settings of one training loop (Qwen3-VL Technical Report §3.1, §4.1).

    python train.py                                   # toy-cpu on the toy world: every stage, eval, sample, plots
    python train.py --out_dir out/toy --resume        # continue exactly where a stopped run left off
    python train.py --preset toy-gpu --batch_size 32 --seq_len 512                     # one GPU
    torchrun --nproc_per_node 8 train.py --preset qwen3-vl-8b --activation_checkpointing ...   # FSDP2, one node
    python train.py --plan --preset qwen3-vl-8b --seq_len 4096 --batch_size 1 --n_gpus 2     # memory/FLOPs plan

Stages (`--stages name:steps,...`, run in order):
    align     stage 0: only the mergers learn (ViT and LLM frozen), on image captions
    shapes    stage 1 opens: all weights, captions and attribute questions only (the names of the shapes)
    pretrain  stage 1: all weights, every task but video, next-token loss on every text token
    video     stage 1 continued: the same with videos added (three times as often as most tasks), and
              text-only colour look-ups (three times too)
    long      stage 2: all weights, rows of 2x seq_len packed with more long (video, multi-image) samples
    binding   SFT's first part: two-object attribute questions ("What color is the square?") and videos
    sft       chat-formatted data, loss on the assistant's tokens only; the mix adds two-object attribute
              questions (data/toyworld.py MIXES["sft"]). After other stages the first of binding / sft
              restarts the learning rate

Data: every row packs whole samples; attention never crosses samples (`document_ids`) and each sample's 3-D
positions start at 0. Row r of the run is filled from its own range of the train split, so any rank can build
any row: the data position is the step, and a run on N GPUs sees exactly the rows of a run on one.
Optimisation: AdamW with decay groups, warmup + one cosine over the run (post-training after other stages: its
own, at --sft_lr_ratio x --lr), global-norm clipping, bf16 autocast (one GPU) or FSDP2 bf16 parameters with fp32
gradient reduction (torchrun), gradient accumulation. The loss of a step is the mean over all its target tokens,
across micro-steps and ranks, so it does not depend on how it is split.
Checkpoints: out_dir/ckpt-<step>/ holds the model and optimizer as a sharded torch.distributed.checkpoint
(resumable on any number of ranks), the step, the RNG states, the run settings and the tokenizer; it is written
under a temporary name and then renamed, and out_dir/latest is replaced atomically, so a kill during a save
leaves the previous checkpoint in place. The end of a run exports out_dir/hf/, a Hugging Face directory.
"""
import argparse
import json
import math
import os
import random
import shutil
import time
import warnings
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from model import PRESETS, Qwen3VL, Qwen3VLConfig, read_hf_config
from rope import rope_index
from moe import load_balancing_loss
from processor import Processor
from tokenizer import Tokenizer

# ----------------------------------------------------------------------------------------------------------
# Run settings

STAGES = {   # name -> task mix of the toy world, trainable part, tokens that carry loss, row length multiplier,
             # and whether it is post-training (SFT: the learning rate restarts at the first such stage, lr_at)
    "align": dict(mix="align", trainable="mergers", loss_on="assistant", seq_mult=1, post=False),
    "shapes": dict(mix="shapes", trainable="all", loss_on="text", seq_mult=1, post=False),
    "pretrain": dict(mix="all", trainable="all", loss_on="text", seq_mult=1, post=False),
    "video": dict(mix="video", trainable="all", loss_on="text", seq_mult=1, post=False),
    "long": dict(mix="long", trainable="all", loss_on="text", seq_mult=2, post=False),
    "binding": dict(mix="binding", trainable="all", loss_on="assistant", seq_mult=1, post=True),
    "sft": dict(mix="sft", trainable="all", loss_on="assistant", seq_mult=1, post=True),
}


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    # model
    p.add_argument("--preset", default="toy-cpu", help="model size (model.PRESETS); ignored with --init_from")
    p.add_argument("--init_from", default="", help="a Hugging Face Qwen3-VL directory (weights + tokenizer) to start from")
    p.add_argument("--vocab_size", type=int, default=1024, help="size of the BPE trained on the toy world (no --init_from)")
    p.add_argument("--pos_embed_std", type=float, default=0.5, help="initial std of the ViT's position table (from "
                   "scratch; 0.5: about the patch features' scale, so tokens know where they are; see README)")
    p.add_argument("--tokenizer", default="", help="a ranks file or HF directory (default: a new BPE for toy presets, "
                                                   "data/qwen.tiktoken for released ones)")
    # data
    p.add_argument("--image_size", type=int, default=96, help="toy world image side in pixels (a multiple of 32)")
    p.add_argument("--stages", default="align:240,shapes:160,pretrain:600,video:480,long:140,binding:120,sft:480",
                   help="name:steps,... in order")
    p.add_argument("--batch_size", type=int, default=4, help="packed rows per micro-step per rank")
    p.add_argument("--seq_len", type=int, default=192, help="tokens per packed row (x2 in the long stage)")
    p.add_argument("--grad_accum", type=int, default=1, help="micro-steps per optimizer step")
    # optimisation
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--min_lr_ratio", type=float, default=0.1, help="cosine floor as a fraction of the peak")
    p.add_argument("--warmup", type=int, default=30, help="warmup steps at the start of the run (and of SFT's)")
    p.add_argument("--sft_lr_ratio", type=float, default=0.5, help="post-training (binding, sft) after other stages "
                   "restarts at this fraction of --lr with a cosine of its own (0: the run's one cosine goes on)")
    p.add_argument("--vision_lr_mult", type=float, default=0.1, help="the ViT's learning rate as a fraction of --lr")
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--beta2", type=float, default=0.95)
    p.add_argument("--grad_clip", type=float, default=1.0, help="global gradient norm limit (0: off)")
    # evaluation, logging, checkpoints
    p.add_argument("--eval_every", type=int, default=400, help="steps between evaluations and checkpoints (0: end only)")
    p.add_argument("--eval_samples", type=int, default=24, help="validation samples per task")
    p.add_argument("--test_samples", type=int, default=64, help="test samples per task in the final evaluation")
    p.add_argument("--max_new_tokens", type=int, default=64, help="longest answer generated in evaluation")
    p.add_argument("--log_every", type=int, default=10)
    p.add_argument("--out_dir", default="out/toy")
    p.add_argument("--resume", action="store_true", help="continue from out_dir's latest checkpoint")
    p.add_argument("--config", default="", help="a JSON file of these settings (command-line flags win)")
    # system
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (auto: cuda if available); torchrun: one GPU per rank")
    p.add_argument("--dtype", default="auto", help="compute dtype: bfloat16 or float32 (auto: bf16 on cuda)")
    p.add_argument("--activation_checkpointing", action="store_true", help="recompute each block in the backward")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--export_dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype of the final Hugging Face export (bfloat16: half the size, as released checkpoints)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data_workers", type=int, default=0, help="processes that pack batches ahead (0: in the loop)")
    # the planner
    p.add_argument("--plan", action="store_true", help="print the memory and FLOPs plan of this run and exit")
    p.add_argument("--n_gpus", type=int, default=1, help="GPUs assumed by --plan")
    p.add_argument("--visual_fraction", type=float, default=0.5, help="share of visual tokens assumed by --plan")
    return p


def parse_args(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.config:
        with open(args.config) as f:
            settings = json.load(f)
        known = {a.dest for a in parser._actions} - {"help", "config"}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise SystemExit(f"error: unknown key(s) {unknown} in {args.config}; known: {sorted(known)}")
        parser.set_defaults(**settings)
        args = parser.parse_args(argv)          # flags given on the command line override the file
    args.stage_list = []
    for item in args.stages.split(","):
        name, _, steps = item.partition(":")
        if name not in STAGES or not steps.isdigit():
            raise SystemExit(f"error: bad stage {item!r}; use name:steps with name in {list(STAGES)}")
        args.stage_list.append((name, int(steps)))
    return args


# ----------------------------------------------------------------------------------------------------------
# Data: toy-world samples -> processor -> packed rows


class Packer:
    """
    Row r of the run packs whole samples from its own slice of the train split, indices [r*SPAN, (r+1)*SPAN),
    in order, until the next one does not fit (it is dropped; a sample longer than a row is skipped). So a row
    is a pure function of its number: ranks build disjoint rows without talking, and resuming needs only the step.
    """
    SPAN = 512

    def __init__(self, world, processor, cfg):
        self.world, self.processor, self.cfg = world, processor, cfg
        self.skipped = 0

    def encode(self, sample, loss_on):
        """One sample -> ids [L], labels [L] (on the stage's tokens), positions [3, L], its pixels and grids."""
        b = self.processor([sample["messages"]])
        ids = b["input_ids"][0]
        if loss_on == "assistant":                        # SFT: the assistant's reply and its <|im_end|>
            labels = b["labels"][0].clone()
        else:                                             # every text token; visual placeholders have no target
            tok = self.processor.tok
            labels = ids.masked_fill((ids == tok.image_token_id) | (ids == tok.video_token_id), -100)
        labels[0] = -100                                  # nothing in the row predicts a sample's first token
        pos, _ = rope_index(b["input_ids"], None, b["image_grid_thw"], b["video_grid_thw"],
                            image_token_id=self.cfg.image_token_id, video_token_id=self.cfg.video_token_id,
                            spatial_merge_size=self.cfg.vision.spatial_merge_size)
        return dict(ids=ids, labels=labels, pos=pos[:, 0], pv=b["pixel_values"], ig=b["image_grid_thw"],
                    pvv=b["pixel_values_videos"], vg=b["video_grid_thw"])

    def row(self, r, stage, seq_len):
        from data.toyworld import MIXES
        mix, loss_on = MIXES[STAGES[stage]["mix"]], STAGES[stage]["loss_on"]
        samples, n = [], 0
        for index in range(r * self.SPAN, (r + 1) * self.SPAN):
            s = self.encode(self.world.sample("train", index, mix=mix), loss_on)
            if len(s["ids"]) > seq_len:
                self.skipped += 1
                continue
            if n + len(s["ids"]) > seq_len:
                break
            samples.append(s)
            n += len(s["ids"])
        return samples

    def batch(self, rows, stage, seq_len):
        return collate([self.row(r, stage, seq_len) for r in rows], seq_len, self.processor.tok.pad_id)


class MicroBatches(torch.utils.data.Dataset):
    """
    Item u is this rank's u-th micro-batch of the run (step u // grad_accum): a DataLoader builds them ahead in
    worker processes (--data_workers) while the model trains. Rows are numbered across micro-steps and ranks.
    """

    def __init__(self, packer, args, rank, world_size):
        self.packer, self.args, self.rank, self.world_size = packer, args, rank, world_size

    def __len__(self):
        return sum(n for _, n in self.args.stage_list) * self.args.grad_accum

    def __getitem__(self, u):
        a = self.args
        step, m = divmod(u, a.grad_accum)
        stage = stage_of(step, a.stage_list)
        first = step * a.batch_size * a.grad_accum * self.world_size + (m * self.world_size + self.rank) * a.batch_size
        skipped = self.packer.skipped
        batch = self.packer.batch(range(first, first + a.batch_size), stage, a.seq_len * STAGES[stage]["seq_mult"])
        return dict(batch, skipped=self.packer.skipped - skipped)


def collate(rows, seq_len, pad_id):
    """Packed rows -> model kwargs (input_ids, document_ids, position_ids [3, B, S], pixels and grids), labels and
    `real` (1 on the samples' tokens, 0 on padding; the MoE load-balancing loss counts only these)."""
    B = len(rows)
    input_ids = torch.full((B, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((B, seq_len), -100, dtype=torch.long)
    document_ids = torch.zeros(B, seq_len, dtype=torch.long)
    real = torch.zeros(B, seq_len, dtype=torch.long)                           # 1 on samples' tokens, 0 on padding
    position_ids = torch.zeros(3, B, seq_len, dtype=torch.long)
    pv, ig, pvv, vg = [], [], [], []
    for b, row in enumerate(rows):
        n = 0
        for d, s in enumerate(row):
            L = len(s["ids"])
            input_ids[b, n:n + L], labels[b, n:n + L] = s["ids"], s["labels"]
            document_ids[b, n:n + L], position_ids[:, b, n:n + L] = d, s["pos"]
            real[b, n:n + L] = 1
            for lst, key in ((pv, "pv"), (ig, "ig"), (pvv, "pvv"), (vg, "vg")):
                if s[key] is not None:
                    lst.append(s[key])
            n += L
        document_ids[b, n:] = torch.arange(len(row), len(row) + seq_len - n)    # each padding token on its own
    cat = lambda xs: torch.cat(xs) if xs else None
    return dict(input_ids=input_ids, labels=labels, real=real, document_ids=document_ids, position_ids=position_ids,
                pixel_values=cat(pv), image_grid_thw=cat(ig), pixel_values_videos=cat(pvv), video_grid_thw=cat(vg))


# ----------------------------------------------------------------------------------------------------------
# Model placement: one device, or FSDP2 shards (torchrun)


def shard(model, mesh, activation_checkpointing):
    """
    FSDP2 the torchtitan way: each decoder block and the whole vision encoder are units of their own, the root
    keeps the embeddings, final norm and (tied) head. Parameters are all-gathered in bf16, gradients reduced in
    fp32; the optimizer sees fp32 shards. Activation checkpointing wraps blocks before sharding.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
        for blocks in (model.language_model.layers, model.visual.blocks):
            for i, block in enumerate(blocks):
                blocks[i] = checkpoint_wrapper(block)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if mesh.device_type == "cuda" else torch.float32,
                              reduce_dtype=torch.float32)
    fully_shard(model.visual, mesh=mesh, mp_policy=mp)
    for layer in model.language_model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)


@torch.no_grad()
def fill(model, tensors):
    """Copy (name, full tensor) pairs into the model's parameters, each rank keeping only its own shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    params = dict(model.named_parameters())
    for name, t in tensors:
        p = params[name] if name in params else _find(params, name)
        t = t.to(device=p.device, dtype=p.dtype)
        if isinstance(p, DTensor):
            t = distribute_tensor(t, p.device_mesh, p.placements, src_data_rank=None)
        p.copy_(t)


def plain_name(key):
    """A parameter's name without the prefix activation checkpointing adds to its block."""
    return key.replace("_checkpoint_wrapped_module.", "")


def _find(params, name):
    """A parameter by its plain name, also when activation checkpointing wrapped its block."""
    for key, p in params.items():
        if plain_name(key) == name:
            return p
    raise KeyError(name)


# ----------------------------------------------------------------------------------------------------------
# Optimiser and schedule


def set_trainable(model, part):
    """'mergers': only the ViT's merger and DeepStack mergers learn (stage 0); 'all': everything."""
    for name, p in model.named_parameters():
        p.requires_grad = part == "all" or is_merger(name)


def is_merger(name):
    """The ViT's merger and DeepStack mergers (visual.merger.*, visual.deepstack_merger_list.*)."""
    return name.startswith("visual.") and "merger" in name


def is_vision_tower(name):
    """The ViT's own parameters (patch and position embeddings, blocks), not its mergers."""
    return name.startswith("visual.") and not is_merger(name)


def make_optimizer(model, args, device):
    """
    AdamW; matrices and embeddings decay, norms and biases do not; the vision tower learns at a fraction of the
    rate (--vision_lr_mult): trained from scratch at the full rate its features collapse (become image-independent)
    before the LLM has learned to read them (toy world, attribute questions only, 1500 steps: 0.52 at the full rate,
    0.93 at 0.1). Its state is created at once for every
    parameter (torch.distributed.checkpoint does it with one zero-gradient, zero-lr step, so step counters start
    at 1), also for the parts a stage freezes: every checkpoint then has the same layout and resumes exactly.
    """
    groups = []
    for tower in (True, False):             # the ViT (not its mergers) learns at lr x vision_lr_mult
        params = [p for n, p in model.named_parameters() if is_vision_tower(n) == tower]
        mult = args.vision_lr_mult if tower else 1.0
        groups += [dict(params=[p for p in params if p.dim() >= 2], weight_decay=args.weight_decay, lr_mult=mult),
                   dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0, lr_mult=mult)]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, args.beta2), eps=1e-8, foreach=True)
    get_state_dict(model, optimizer)
    return optimizer


def cosine(step, length, peak, args):
    """Linear warmup, then a cosine from the peak to min_lr_ratio * peak at step `length`."""
    warmup = min(args.warmup, max(1, length // 10))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, length - warmup)
    return peak * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def lr_at(step, args):
    """One cosine over the whole run at --lr: the stages change the data, the loss and what is trainable, not the
    schedule (restarting at the peak between them undid what was learned). Post-training (binding, sft) that
    follows other stages starts a cosine of its own at sft_lr_ratio * --lr, as post-training is a run of its
    own in the paper (0: the run's cosine goes on; README: the toy run)."""
    post = [STAGES[name]["post"] for name, _ in args.stage_list]
    total = sum(n for _, n in args.stage_list)
    post_start = sum(n for _, n in args.stage_list[:post.index(True)]) if True in post else total
    if args.sft_lr_ratio > 0 and 0 < post_start <= step:
        return cosine(step - post_start, total - post_start, args.lr * args.sft_lr_ratio, args)
    return cosine(step, total, args.lr, args)


def stage_of(step, stage_list):
    """The name of the stage a global step belongs to."""
    for name, n in stage_list:
        if step < n:
            return name
        step -= n
    raise ValueError(f"step {step} is past the last stage")


# ----------------------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(out_dir, model, optimizer, tok, step, args, rank):
    """
    out_dir/ckpt-<step>/: dcp/ (model + optimizer, one shard per rank), config.json, tokenizer.tiktoken,
    train_state.json (step, settings) and rng-<rank>.pt, written as ckpt-<step>.tmp, then renamed; then
    out_dir/latest is replaced atomically and older checkpoints are deleted.
    """
    name = f"ckpt-{step:07d}"
    final, tmp = os.path.join(out_dir, name), os.path.join(out_dir, name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")   # one process: no sharding needed
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(tmp, "dcp"))
    rng = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
               cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    torch.save(rng, os.path.join(tmp, f"rng-{rank}.pt"))
    barrier()
    if rank == 0:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(model.cfg.to_hf_dict(), f, indent=2)
        tok.save(os.path.join(tmp, "tokenizer.tiktoken"))
        with open(os.path.join(tmp, "train_state.json"), "w") as f:
            json.dump(dict(step=step, args={k: v for k, v in vars(args).items() if k != "stage_list"}), f, indent=2)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(os.path.join(out_dir, "latest.tmp"), "w") as f:
            f.write(name)
        os.replace(os.path.join(out_dir, "latest.tmp"), os.path.join(out_dir, "latest"))
        for old in os.listdir(out_dir):
            if old.startswith("ckpt-") and old != name:
                shutil.rmtree(os.path.join(out_dir, old), ignore_errors=True)
    barrier()


def latest_checkpoint(out_dir):
    latest = os.path.join(out_dir, "latest")
    if not os.path.isfile(latest):
        raise SystemExit(f"error: --resume: no checkpoint in {out_dir!r} (no 'latest' file)")
    with open(latest) as f:
        return os.path.join(out_dir, f.read().strip())


def load_checkpoint(path, model, optimizer, rank):
    """Model, optimizer and RNG from a checkpoint written by any number of ranks; returns its step."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    dcp.load(state, checkpoint_id=os.path.join(path, "dcp"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_file = os.path.join(path, f"rng-{rank}.pt")
    if os.path.isfile(rng_file):              # a run resumed on more ranks than it was saved with starts their RNG anew
        rng = torch.load(rng_file, weights_only=False)   # our own file: Python/NumPy RNG states are not tensors
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    with open(os.path.join(path, "train_state.json")) as f:
        return json.load(f)["step"]


def export_hf(model, tok, processor, path, rank, dtype=torch.float32):
    """The trained model as a Hugging Face directory of `dtype` tensors, with our tokenizer. The shards are gathered
    one tensor at a time and rank 0 keeps each only in `dtype`: its host memory holds the model once (an 8B export
    in bf16: 16 GiB), never a full fp32 copy beside it."""
    from torch.distributed.tensor import DTensor
    sd = {}
    for name, t in model.state_dict().items():
        if isinstance(t, DTensor):
            t = t.full_tensor()                                      # every rank takes part in each gather
        if rank == 0:
            sd[plain_name(name)] = t.detach().to("cpu", dtype)
    if rank == 0:
        with torch.device("meta"):
            plain = Qwen3VL(model.cfg)
        plain.load_state_dict(sd, assign=True)
        if plain.cfg.tie_word_embeddings:
            plain.lm_head.weight = plain.language_model.embed_tokens.weight
        plain.save_pretrained(path)
        tok.save(os.path.join(path, "tokenizer.tiktoken"))
        with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
            json.dump(dict(min_pixels=processor.min_pixels, max_pixels=processor.max_pixels), f)
    barrier()


# ----------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model, processor, world, split, n_per_task, device, autocast, max_new_tokens, batch_size=64):
    """Greedy answers to n_per_task samples of every task: ({task: mean score}, {task: {kind: mean score}},
    {task: (sample, reply)}); a task's kinds are its question families (attribute: color / shape, compare: shape /
    color / all, ...), so a task score near chance can be told apart from one failing kind.
    Every rank runs the same batches (identical greedy decodes keep FSDP's collectives in step)."""
    from data.toyworld import TASKS
    from sample import generate
    model.eval()
    scores, kinds, examples = {}, {}, {}
    for task in TASKS:
        samples = [world.sample(split, i, task=task) for i in range(n_per_task)]
        by_kind = {}                                                 # kind -> the scores of its samples
        for i in range(0, len(samples), batch_size):
            chunk = samples[i:i + batch_size]
            batch = processor([s["messages"][:1] for s in chunk], add_generation_prompt=True)
            batch = {k: v.to(device) for k, v in batch.items() if v is not None and k != "labels"}
            with autocast:
                out = generate(model, **batch, max_new_tokens=max_new_tokens, temperature=0.0,
                               eos_ids=processor.tok.eos_ids, pad_id=processor.tok.pad_id)
            for s, ids in zip(chunk, out.tolist()):
                reply = processor.tok.decode(ids, skip_special_tokens=True).strip()
                by_kind.setdefault(s["kind"], []).append(TASKS[task].score(reply, s))
                examples.setdefault(task, (s, reply))
        scores[task] = sum(map(sum, by_kind.values())) / len(samples)
        kinds[task] = {k: sum(v) / len(v) for k, v in sorted(by_kind.items())}
    model.train()
    return scores, kinds, examples


def plot(out_dir, metrics, stage_list):
    """loss.png (training loss, stages marked) and metrics.png (validation score per task, chance dotted)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from data.toyworld import TASKS
    train = [m for m in metrics if "loss" in m]
    evals = [m for m in metrics if "eval" in m]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot([m["step"] for m in train], [m["loss"] for m in train], lw=1)
    ax.set(xlabel="step", ylabel="train loss", yscale="log", title="training loss")
    edge = 0
    for name, n in stage_list:
        ax.axvline(edge, color="gray", ls=":", lw=0.8)
        ax.annotate(name, (edge, 1), xycoords=("data", "axes fraction"), va="top", fontsize=8)
        edge += n
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "loss.png"), dpi=120)
    plt.close(fig)
    if evals:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for i, task in enumerate(TASKS):
            c, style = f"C{i % 10}", dict(marker="o", ls="-") if i < 10 else dict(marker="s", ls="--")  # 10 colours
            ax.plot([m["step"] for m in evals], [m["eval"][task] for m in evals], ms=3, color=c, label=task, **style)
            ax.axhline(TASKS[task].chance, color=c, ls=":", lw=0.8)
        ax.set(xlabel="step", ylabel="validation score", ylim=(0, 1.02), title="per-task score (dotted: chance)")
        ax.legend(fontsize=7, ncol=2, loc="upper left")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "metrics.png"), dpi=120)
        plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# Memory and FLOPs planner


def plan(cfg, seq_len, batch_size, n_gpus, activation_checkpointing, visual_fraction=0.5):
    """
    Per-GPU memory (bytes) and FLOPs per token of a training step under FSDP2 with bf16 compute. Model state
    (sharded): fp32 parameters 4P, fp32 gradients 4P, AdamW moments 8P, all / n_gpus; plus the unsharded bf16
    parameters of the two largest units in flight (current and prefetched). Activations (bf16, saved for the
    backward) per token and block, counted tensor by tensor from model.py; with checkpointing only each block's
    input is kept plus one block's worth being recomputed. The logits are kept in bf16 and fp32 (cross-entropy).
    """
    t, v = cfg.text, cfg.vision
    with torch.device("meta"):
        model = Qwen3VL(cfg)
    P = model.num_params()
    units = [sum(p.numel() for p in layer.parameters()) for layer in model.language_model.layers]
    units += [sum(p.numel() for p in model.visual.parameters()), P - sum(units) - sum(p.numel() for p in model.visual.parameters())]
    state = 16 * P / n_gpus + 2 * 2 * sorted(units)[-1] + 2 * 2 * sorted(units)[-2]
    tokens = seq_len * batch_size
    H, I, q, kv = t.hidden_size, t.intermediate_size if t.num_experts == 0 else t.moe_intermediate_size * t.num_experts_per_tok, \
        t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    # LLM block, bytes per token (bf16): input, norm out, q/k/v (+ normed/rotated q,k), attention out, residual,
    # norm out, gate/up/silu/product, plus fp32 norm statistics
    llm = 2 * (H + H + 2 * q + 4 * kv + q + H + H + 4 * I) + 4 * 4
    D, Iv = v.hidden_size, v.intermediate_size
    vit = 2 * (D + D + 3 * D + 2 * D + D + D + D + 2 * Iv)       # per patch
    patches = 4 * visual_fraction * tokens                        # 4 patches per visual token (2x2 merge)
    full = tokens * llm * t.num_hidden_layers + patches * vit * v.depth
    kept = tokens * 2 * H * t.num_hidden_layers + patches * 2 * D * v.depth + tokens * llm + patches * vit
    logits = tokens * t.vocab_size * (2 + 4 + 4)                  # bf16 logits, fp32 copy, fp32 grad
    acts = (kept if activation_checkpointing else full) + logits
    emb = t.vocab_size * H
    active = P - (t.num_hidden_layers * t.num_experts * 3 * H * t.moe_intermediate_size) * (1 - t.num_experts_per_tok / max(1, t.num_experts)) if t.num_experts else P
    vit_params = sum(p.numel() for p in model.visual.parameters())
    llm_flops = 6 * (active - vit_params - emb * (1 if cfg.tie_word_embeddings else 2)) + 6 * emb \
        + 6 * t.num_hidden_layers * q * seq_len                  # causal attention: half of 12 L q S
    vit_flops = 4 * visual_fraction * 6 * vit_params             # per LLM token, 4 patches per visual token
    return dict(params=P, state=state, activations=acts, total=state + acts, flops_per_token=llm_flops + vit_flops)


def print_plan(args):
    """The plan of --init_from's config or of --preset ('all': every released size)."""
    if args.init_from:
        configs = {args.init_from: read_hf_config(args.init_from)}
    elif args.preset == "all":
        configs = {n: Qwen3VLConfig.from_preset(n) for n in PRESETS if n.startswith("qwen3-vl-")}
    else:
        configs = {args.preset: Qwen3VLConfig.from_preset(args.preset)}
    print(f"seq_len {args.seq_len}, batch {args.batch_size} per GPU, {args.n_gpus} GPUs, FSDP2 bf16, AdamW; "
          f"{args.visual_fraction:.0%} visual tokens")
    print(f"{'model':>20s} {'params':>9s} {'state/GPU':>10s} {'acts/GPU':>9s} {'acts+AC':>9s} {'total/GPU':>10s} {'TFLOP/tok':>10s}")
    for name, c in configs.items():
        a = plan(c, args.seq_len, args.batch_size, args.n_gpus, False, args.visual_fraction)
        b = plan(c, args.seq_len, args.batch_size, args.n_gpus, True, args.visual_fraction)
        tot = b["total"] if args.activation_checkpointing else a["total"]
        print(f"{name:>20s} {a['params'] / 1e9:8.2f}B {a['state'] / 2**30:9.1f}G {a['activations'] / 2**30:8.1f}G "
              f"{b['activations'] / 2**30:8.1f}G {tot / 2**30:9.1f}G {a['flops_per_token'] / 1e12:10.4f}")


# ----------------------------------------------------------------------------------------------------------
# Main


def barrier():
    if dist.is_initialized():
        dist.barrier()


def main(argv=None):
    args = parse_args(argv)
    if args.plan:
        return print_plan(args)
    from data.toyworld import TASKS, ToyWorld

    # -- compute: one process, or one rank per GPU under torchrun --
    distributed = "RANK" in os.environ
    if distributed:
        use_cuda = torch.cuda.is_available() and args.device in ("auto", "cuda")
        dist.init_process_group("nccl" if use_cuda else "gloo")
        rank, world_size = dist.get_rank(), dist.get_world_size()
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh(device.type, (world_size,))
    else:
        rank, world_size = 0, 1
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                              "cpu" if args.device == "auto" else args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "bfloat16": torch.bfloat16,
             "float32": torch.float32}[args.dtype]
    # FSDP casts parameters itself; a single device uses autocast
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 and not distributed else nullcontext()
    say = print if rank == 0 else (lambda *a, **k: None)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    world = ToyWorld(seed=args.seed, image_size=args.image_size)

    # -- tokenizer and model config: from the checkpoint resumed, from --init_from, or a preset + a new BPE --
    resume = latest_checkpoint(args.out_dir) if args.resume else None
    if resume:
        tok = Tokenizer.from_pretrained(os.path.join(resume, "tokenizer.tiktoken"))
        cfg = read_hf_config(resume)
    elif args.init_from:
        try:
            cfg = read_hf_config(args.init_from)
            tok = Tokenizer.from_pretrained(args.init_from)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"error: --init_from {args.init_from!r}: {e}") from e
        if tok.n_vocab > cfg.text.vocab_size or tok.image_token_id != cfg.image_token_id:
            raise SystemExit(f"error: --init_from {args.init_from!r}: its tokenizer ({tok.n_vocab} tokens, image "
                             f"token {tok.image_token_id}) does not fit its model (vocab {cfg.text.vocab_size}, "
                             f"image token {cfg.image_token_id})")
    elif args.preset.startswith("qwen3-vl-"):  # a released size from scratch: the real vocabulary at its real ids
        tok = Tokenizer.from_pretrained(args.tokenizer or None)
        cfg = Qwen3VLConfig.from_preset(args.preset)
        if tok.image_token_id != cfg.image_token_id:
            raise SystemExit(f"error: --tokenizer puts <|image_pad|> at {tok.image_token_id}, {args.preset} at "
                             f"{cfg.image_token_id}")
    else:   # a toy size: its own small BPE (or --tokenizer) trained on the world's text and the chat template's
            # words (else "assistant" costs six tokens in every sample), vocabulary rounded up to a multiple of 64
        t0 = time.time()
        tok = Tokenizer.from_pretrained(args.tokenizer) if args.tokenizer else \
            Tokenizer.train((f"user\n{t}\nassistant\n" for t in world.text_corpus(4000)), args.vocab_size)
        say(f"trained a {tok.n_vocab}-token BPE on the toy world in {time.time() - t0:.1f}s")
        cfg = Qwen3VLConfig.from_preset(
            args.preset, text=dict(vocab_size=64 * math.ceil(tok.n_vocab / 64)),
            image_token_id=tok.image_token_id, video_token_id=tok.video_token_id,
            vision_start_token_id=tok.vision_start_id, vision_end_token_id=tok.vision_end_id)

    # -- the model: built on the meta device, placed (and sharded), then initialised or loaded tensor by tensor --
    with torch.device("meta"):
        model = Qwen3VL(cfg)
    if distributed:
        shard(model, mesh, args.activation_checkpointing)
    model.to_empty(device=device)
    if cfg.tie_word_embeddings and not distributed:
        model.lm_head.weight = model.language_model.embed_tokens.weight
    if args.init_from and not resume:
        try:
            fill(model, Qwen3VL.checkpoint_tensors(model, args.init_from))
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"error: --init_from {args.init_from!r}: {e}") from e
    elif not resume:                           # (a resumed run loads every tensor from its checkpoint below)
        # every tensor at the reference's initializer_range except the ViT's position table: at 0.02 it is ~35x
        # below the patch features and the tokens cannot tell the LLM where they are (README: the toy run)
        stds = {"visual.pos_embed.weight": args.pos_embed_std}
        fill(model, ((n, Qwen3VL.initial_value(n, p.shape, args.seed, stds.get(n, 0.02)))
                     for n, p in model.named_parameters()))
    processor = Processor(tok, min_pixels=args.image_size ** 2 // 2, max_pixels=args.image_size ** 2 * 4)
    n_vit = sum(p.numel() for p in model.visual.parameters())
    say(f"model: {cfg.text.num_hidden_layers} x {cfg.text.hidden_size} LLM + {cfg.vision.depth} x "
        f"{cfg.vision.hidden_size} ViT, {model.num_params():,} parameters ({n_vit:,} in the ViT); {world_size} x {device.type}, "
        f"compute {dtype}{', FSDP2' if distributed else ''}")
    optimizer = make_optimizer(model, args, device)
    step, metrics = 0, []
    if resume:
        step = load_checkpoint(resume, model, optimizer, rank)
        with open(os.path.join(args.out_dir, "metrics.jsonl")) as f:
            metrics = [m for m in map(json.loads, f) if m["step"] <= step]   # drop what was logged after the save
        say(f"resumed from {resume} at step {step}")
    if rank == 0:
        with open(os.path.join(args.out_dir, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(m) + "\n" for m in metrics)
    train_model = torch.compile(model) if args.compile else model
    data = MicroBatches(Packer(world, processor, cfg), args, rank, world_size)
    loader = iter(torch.utils.data.DataLoader(data, batch_size=None, num_workers=args.data_workers,
                                              sampler=range(step * args.grad_accum, len(data)),
                                              prefetch_factor=4 if args.data_workers else None))
    skipped = 0

    total_steps = sum(n for _, n in args.stage_list)
    planned = plan(cfg, args.seq_len, args.batch_size, world_size, args.activation_checkpointing)
    fpt = planned["flops_per_token"]
    say(f"plan: {planned['total'] / 2**30:.1f} GiB per GPU ({planned['state'] / 2**30:.1f} model state, "
        f"{planned['activations'] / 2**30:.1f} activations), {fpt / 1e9:.2f} GFLOP per token")
    peak = 989e12 if device.type == "cuda" else None               # H100/H200 dense bf16
    log = open(os.path.join(args.out_dir, "metrics.jsonl"), "a") if rank == 0 else None
    t_start, tokens_run = time.time(), 0

    # -- the loop --
    model.train()
    while True:
        last_step = step == total_steps
        if step > 0 and ((args.eval_every and step % args.eval_every == 0) or last_step):
            scores, _, _ = evaluate(model, processor, world, "val", args.eval_samples, device, autocast,
                                    args.max_new_tokens)
            metrics.append(dict(step=step, eval=scores))
            if rank == 0:
                log.write(json.dumps(metrics[-1]) + "\n")
                log.flush()
                plot(args.out_dir, metrics, args.stage_list)
            say("eval  " + "  ".join(f"{k} {v:.2f}" for k, v in scores.items()))
            save_checkpoint(args.out_dir, model, optimizer, tok, step, args, rank)
        if last_step:
            break

        stage = stage_of(step, args.stage_list)
        set_trainable(model, STAGES[stage]["trainable"])
        lr = lr_at(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        t0 = time.time()
        seq_len = args.seq_len * STAGES[stage]["seq_mult"]
        rows_per_step = args.batch_size * args.grad_accum * world_size
        micro = [next(loader) for _ in range(args.grad_accum)]          # this rank's micro-batches of the step
        skipped += sum(b.pop("skipped") for b in micro)
        # the step's loss is the mean over all its target tokens, on every rank and micro-step
        n_target = torch.tensor(float(sum((b["labels"][:, 1:] != -100).sum() for b in micro)), device=device)
        if distributed:
            dist.all_reduce(n_target)
        loss_sum = torch.zeros((), device=device)
        for b in micro:
            b = {k: v.to(device) for k, v in b.items() if v is not None}
            labels, real = b.pop("labels"), b.pop("real")
            with autocast:
                logits, _ = train_model(**b, run_vision=distributed)
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                                   ignore_index=-100, reduction="sum") / n_target
            if cfg.text.num_experts:           # MoE: + coef x Switch load-balancing loss of this micro-step
                loss = loss + cfg.text.router_aux_loss_coef / args.grad_accum * load_balancing_loss(
                    model.router_logits, cfg.text.num_experts_per_tok, real)
            (loss * world_size).backward()     # FSDP averages gradients over ranks: undo it, the loss is global
            loss_sum += loss.detach()
        if distributed:
            dist.all_reduce(loss_sum)
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss_value = loss_sum.item()
        dt = time.time() - t0
        tokens = rows_per_step * seq_len
        tokens_run += tokens
        metrics.append(dict(step=step, stage=stage, loss=loss_value, lr=lr))
        if rank == 0:
            log.write(json.dumps(metrics[-1]) + "\n")
        if step % args.log_every == 0 or step == 1:
            tps = tokens / dt
            gpu_stats = ""
            if peak:                           # the peak memory of every GPU (all ranks take part in the gather)
                mem = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30], device=device)
                mems = [mem]
                if distributed:
                    mems = [torch.empty_like(mem) for _ in range(world_size)]
                    dist.all_gather(mems, mem)
                gpu_stats = f" | MFU {100 * fpt * tps / (peak * world_size):.1f}% | peak mem " \
                            f"{'/'.join(f'{m.item():.1f}' for m in mems)} GiB"
            eta = (time.time() - t_start) / tokens_run * tokens * (total_steps - step)
            say(f"step {step:5d}/{total_steps} | {stage:8s} | loss {loss_value:.4f} | lr {lr:.2e} | "
                f"{1000 * dt:.0f} ms | {tps:,.0f} tok/s{gpu_stats} | ETA {eta / 60:.1f} min", flush=True)
    if rank == 0:
        log.close()

    # -- final: test evaluation, a Hugging Face export, one answer drawn on its image --
    scores, kinds, examples = evaluate(model, processor, world, "test", args.test_samples, device, autocast,
                                       args.max_new_tokens)
    export_hf(model, tok, processor, os.path.join(args.out_dir, "hf"), rank, getattr(torch, args.export_dtype))
    if rank == 0:
        say(f"\ntest ({args.test_samples} samples per task)   score   chance   by kind of question")
        for task, v in scores.items():
            by_kind = ", ".join(f"{k} {x:.2f}" for k, x in kinds[task].items()) if len(kinds[task]) > 1 else ""
            say(f"  {task:10s}                  {v:6.2f}   {TASKS[task].chance:6.2f}   {by_kind}")
        with open(os.path.join(args.out_dir, "test_scores.json"), "w") as f:
            json.dump({t: dict(score=v, chance=TASKS[t].chance, kinds=kinds[t]) for t, v in scores.items()}, f,
                      indent=2)
        from processor import draw_grounding, parse_grounding
        s, reply = examples["bbox"]
        say(f"\nsample: {s['question']}\n  model: {reply}\n  truth: {s['answer']}")
        try:
            items = parse_grounding(reply)
        except ValueError:
            items = []
        draw_grounding(s["messages"][0]["content"][0]["image"].resize((256, 256)), items,
                       os.path.join(args.out_dir, "sample.png"))
        say(f"wrote {args.out_dir}/: loss.png, metrics.png, sample.png, metrics.jsonl, test_scores.json, hf/ "
            f"(Hugging Face export); {skipped} samples skipped as longer than a row; "
            f"{(time.time() - t_start) / 60:.1f} min")
    if distributed:
        dist.destroy_process_group()
    return scores


if __name__ == "__main__":
    main()
