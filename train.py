"""
Train Qwen3-VL: the paper's recipe as settings of one training loop (Qwen3-VL Technical Report §3.1, §4.1), on any
data behind the interface of data/__init__.py.

    python train.py                                   # the toy run: toy-cpu on the toy world, every stage, eval, plots
    python train.py --out_dir out/toy --resume        # continue exactly where a stopped run left off
    python train.py --init_from Qwen3-VL-2B-Instruct --data my.jsonl --eval_data held_out.jsonl --stages sft:500
    python train.py --preset toy-cpu --data my.jsonl --stages pretrain:2000,sft:500     # from scratch, your data
    torchrun --nproc_per_node 8 train.py --preset qwen3-vl-8b --activation_checkpointing ...   # FSDP2, one node
    torchrun --nproc_per_node 8 train.py --cp 4 --seq_len 65536 ...   # rows split over 4 GPUs, 2 rows at a time
    python train.py --plan --preset qwen3-vl-8b --seq_len 4096 --batch_size 1 --n_gpus 2     # memory/FLOPs plan

Stages (`--stages name:steps,...`, run in order), the paper's:
    align     stage 0: only the mergers learn (ViT and LLM frozen), loss on the replies
    pretrain  stage 1: all weights, next-token loss on every text token
    long      stage 2: all weights, rows of --long_seq_mult x --seq_len (the paper's 32K after 8K)
    ultralong stage 3: all weights, rows of 32 x --seq_len (the paper's 256K after 8K)
    sft       post-training: loss on the assistant's tokens only; after other stages its learning rate restarts
A dataset may name stages of its own, each a setting of one of these with its own mix (the toy recipe, data/toy.py:
shapes, video, binding).

Data: `--data` is `toy` (the built-in toy world, with the toy recipe's settings as defaults: data/toy.py) or JSONL
conversations (data/jsonl.py), several with weights: `--data a.jsonl:3,b.jsonl:1`. Every row packs whole samples;
attention never crosses samples (`document_ids`) and each sample's 3-D positions start at 0. Row r of the run is
filled from its own range of sample numbers, so any rank can build any row: the data position is the step, and a
run on N GPUs sees exactly the rows of a run on one.
Optimisation: AdamW with decay groups, warmup + one cosine over the run (post-training after other stages: its
own, at --sft_lr_ratio x --lr), global-norm clipping, bf16 autocast (one GPU) or FSDP2 bf16 parameters with fp32
gradient reduction (torchrun), gradient accumulation. The loss of a step is the mean over all its target tokens
(or, with --loss_weighting sqrt, each sample's tokens weighted by 1/sqrt(its token count)), across micro-steps and
ranks, so it does not depend on how it is split.
Long rows (--cp N): each row's sequence is split over N ranks by torch's own context parallelism (ContextParallel);
the ranks are FSDP x CP, the loss is still the mean over all target tokens, as in one process.
Checkpoints: out_dir/ckpt-<step>/ holds the model and optimizer as a sharded torch.distributed.checkpoint
(resumable on any number of ranks), the step, the RNG states, the run settings, the tokenizer and the image budgets;
it is written under a temporary name and then renamed, and out_dir/latest is replaced atomically, so a kill during
a save leaves the previous checkpoint in place. Nothing read back from a checkpoint can run code. A checkpoint (or
the run's folder) loads in sample.py, eval.py and as --init_from of the next run. The end of a run exports
out_dir/hf/, a Hugging Face directory.
"""
import argparse
import json
import math
import os
import pickle
import random
import shutil
import sys
import time
import warnings
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor.experimental._context_parallel import (_context_parallel_shard, _ContextParallel,
                                                                     _HeadTailLoadBalancer)
from torch.distributed.tensor.parallel import parallelize_module

import flex
from data import BadSample, open_data
from eval import evaluate, report
from config import PRESETS, Qwen3VLConfig, flat_arch, get_field, parse_arch, read_hf_config, write_json
from model import Qwen3VL, prompt_positions
from moe import load_balancing_loss
from processor import Processor
from tokenizer import Tokenizer

# ----------------------------------------------------------------------------------------------------------
# Run settings

# The paper's stages (Qwen3-VL Technical Report §3.1 and Table 1, §4.1) and what they are here. A stage's rows are
# --seq_len x its multiplier (long: x --long_seq_mult): at the paper's --seq_len 8192 they are the paper's rows.
#
#   paper                                          here
#   stage                     trains   tokens  rows    stage       rows (default)   toy recipe (data/toy.py)
#   0 vision-language align   mergers  67B     8K      align       --seq_len  8K    align          192
#   1 multimodal pretraining  all      ~1T     8K      pretrain    --seq_len  8K    shapes, pretrain, video 192
#   2 long-context pretrain   all      ~1T     32K     long        x4        32K    long           384 (x2)
#   3 ultra-long adaptation   all      100B    256K    ultralong   x32      256K    -
#   post-training SFT         all      -       32K,    sft         --seq_len  8K    binding, sft   192
#                                              256K
#
# Stages 2 and 3 add long documents and long videos to the mix; here a stage's mix is the data's (a recipe's own
# stages, as the toy's), the paper's stages set what learns, which tokens carry loss and the rows. The RoPE
# base is the checkpoint config's rope_theta in every stage (5,000,000 in every released size): the long stages
# change the rows, not the positions' frequencies. The paper's SFT runs 32K then 256K rows: --seq_len 32768, then
# 262144. Past 256K the released models extend with YaRN (text.rope_scaling; config.TextConfig.context_length).
STAGES = {   # trainable part, tokens that carry loss, row length multiplier (None: --long_seq_mult), and whether it
             # is post-training (the learning rate restarts at the first such stage that follows others, lr_at)
    "align": dict(trainable="mergers", loss_on="assistant", seq_mult=1, post=False),
    "pretrain": dict(trainable="all", loss_on="text", seq_mult=1, post=False),
    "long": dict(trainable="all", loss_on="text", seq_mult=None, post=False),
    "ultralong": dict(trainable="all", loss_on="text", seq_mult=32, post=False),
    "sft": dict(trainable="all", loss_on="assistant", seq_mult=1, post=True),
}


def get_parser():
    from data.toy import SETTINGS, STAGES as TOY_STAGES
    toy = ", ".join(f"--{k} {v}" for k, v in SETTINGS.items())
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=Formatter,
                                epilog=__doc__.split("\n\n", 1)[1] + f"\nWith --data toy (the default) the toy recipe "
                                f"(data/toy.py) replaces the defaults below: {toy}, --out_dir out/toy.")
    # model
    p.add_argument("--preset", default="toy-cpu", choices=list(PRESETS) + ["all"],
                   help="model size; ignored with --init_from ('all': every released size, with --plan)")
    p.add_argument("--init_from", default="", help="start from a Hugging Face Qwen3-VL directory, a train.py "
                   "checkpoint, or a train.py output directory (its latest checkpoint): weights and tokenizer")
    p.add_argument("--tokenizer", default="", help="a ranks file or HF directory (default: the checkpoint's; a new "
                   "BPE on the toy world's text for toy presets on toy data; else data/qwen.tiktoken)")
    p.add_argument("--vocab_size", type=int, default=1024, help="size of the BPE trained for a toy preset on toy data")
    p.add_argument("--pos_embed_std", type=float, default=0.02, help="initial std of the ViT's position table "
                   "(from scratch; the reference's initializer_range)")
    p.add_argument("--arch", default="", help="KEY=VALUE,... config fields of a new model over the preset's, dotted for "
                   "text. / vision. (config.parse_arch), e.g. the ablations deepstack=false,text.mrope_layout=chunked,"
                   "video_time=trope (config.ABLATIONS); such a model is not exported to Hugging Face")
    # data
    p.add_argument("--data", default="toy", help="'toy' or JSONL files with weights: a.jsonl:3,b.jsonl:1")
    p.add_argument("--eval_data", default="", help="JSONL files scored during training (default: the toy world's "
                   "validation split with --data toy, else none)")
    p.add_argument("--test_data", default="", help="JSONL files scored at the end (default: the toy world's test "
                   "split with --data toy, else --eval_data)")
    p.add_argument("--skip_bad_samples", action="store_true", help="skip (and count) samples that cannot be used "
                   "(malformed lines, missing images, longer than a row) instead of stopping with an error")
    p.add_argument("--image_size", type=int, default=96, help="the toy world's image side in pixels (a multiple of 32)")
    p.add_argument("--min_pixels", type=int, default=0, help="image pixel budget, lower (0: the checkpoint's, the toy "
                   "world's, or the released processor's)")
    p.add_argument("--max_pixels", type=int, default=0, help="image pixel budget, upper (0: as --min_pixels)")
    p.add_argument("--stages", default="sft:1000", help="name:steps,... in order; names: " + ", ".join(STAGES) +
                   " (and a dataset's own: the toy world's " + ", ".join(n for n in TOY_STAGES if n not in STAGES)
                   + ")")
    p.add_argument("--batch_size", type=int, default=1, help="packed rows per micro-step per rank")
    p.add_argument("--seq_len", type=int, default=8192, help="tokens per packed row of stages 0 and 1 and SFT (the "
                   "paper's 8K); --long_seq_mult x in the long stage, 32 x in ultralong")
    p.add_argument("--long_seq_mult", type=int, default=4, help="rows of the long stage, in --seq_len (the paper's "
                   "32K rows after 8K)")
    p.add_argument("--grad_accum", type=int, default=1, help="micro-steps per optimizer step")
    p.add_argument("--loss_weighting", default="token", choices=["token", "sqrt"], help="token: the mean over target "
                   "tokens; sqrt: each sample's tokens weigh 1/sqrt(its target count), balancing long and short ones")
    # optimisation
    p.add_argument("--lr", type=float, default=1e-5, help="peak learning rate")
    p.add_argument("--min_lr_ratio", type=float, default=0.1, help="cosine floor as a fraction of the peak")
    p.add_argument("--warmup", type=int, default=30, help="warmup steps at the start of the run (and of SFT's)")
    p.add_argument("--sft_lr_ratio", type=float, default=1.0, help="post-training after other stages restarts at "
                   "this fraction of --lr with a cosine of its own (0: the run's one cosine goes on)")
    p.add_argument("--vision_lr_mult", type=float, default=1.0, help="the ViT's learning rate as a fraction of --lr")
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--beta2", type=float, default=0.95)
    p.add_argument("--grad_clip", type=float, default=1.0, help="global gradient norm limit (0: off)")
    # evaluation, logging, checkpoints
    p.add_argument("--eval_every", type=int, default=500, help="steps between evaluations and checkpoints (0: end only)")
    p.add_argument("--eval_samples", type=int, default=50, help="evaluation samples per task during training (0: "
                   "no evaluation, checkpoints only)")
    p.add_argument("--test_samples", type=int, default=0, help="samples per task at the end (0: all of a file; the "
                   "toy world: no test)")
    p.add_argument("--eval_tasks", default="", help="tasks scored in evaluation and at the end, comma-separated "
                   "(default: all of the data's; the toy world's: the toy run's, not the studies' of ablate.py)")
    p.add_argument("--max_new_tokens", type=int, default=256, help="longest answer generated in evaluation")
    p.add_argument("--log_every", type=int, default=10)
    p.add_argument("--out_dir", default="out/run")
    p.add_argument("--resume", action="store_true", help="continue from out_dir's latest good checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start anew in an out_dir that holds a run")
    p.add_argument("--keep_checkpoints", type=int, default=2, help="checkpoints kept (the newest; a resume falls "
                   "back to an older one if the newest is damaged)")
    p.add_argument("--config", default="", help="a JSON file of these settings (command-line flags win)")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    # system
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (auto: cuda if available); torchrun: one GPU per rank")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="compute dtype (auto: bf16 on cuda)")
    p.add_argument("--activation_checkpointing", action="store_true", help="recompute each block in the backward")
    p.add_argument("--cp", type=int, default=1, help="context parallelism: split each row's sequence over this many "
                   "ranks (torchrun, CUDA; --seq_len a multiple of 128 x cp); --plan: over cp of the --n_gpus GPUs")
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


class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help shows the module docstring as written and every flag's default."""


AT_LEAST = dict(batch_size=1, seq_len=8, long_seq_mult=1, grad_accum=1, vocab_size=300, eval_every=0, eval_samples=0,
                test_samples=0, max_new_tokens=1, log_every=1, warmup=0, keep_checkpoints=1, data_workers=0, n_gpus=1,
                cp=1, image_size=96, min_pixels=0, max_pixels=0)


def parse_args(argv=None):
    """Flags over --config over the toy recipe (with --data toy) over the defaults above; every value checked."""
    parser = get_parser()
    args = parser.parse_args(argv)
    settings = {}
    if args.config:
        try:
            with open(args.config) as f:
                settings = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            parser.error(f"--config {args.config}: {e}")
        known = {a.dest for a in parser._actions} - {"help", "config"}
        unknown = sorted(set(settings) - known)
        if unknown:
            parser.error(f"unknown key(s) {unknown} in {args.config}; known: {sorted(known)}")
        parser.set_defaults(**settings)
    if parser.parse_args(argv).data == "toy":
        from data.toy import SETTINGS
        parser.set_defaults(**SETTINGS, out_dir="out/toy")
        parser.set_defaults(**settings)
    args = parser.parse_args(argv)          # flags given on the command line override the file and the recipe
    for name, least in AT_LEAST.items():
        if getattr(args, name) < least:
            parser.error(f"--{name} {getattr(args, name)}: must be >= {least}")
    for name in ("lr", "min_lr_ratio", "sft_lr_ratio", "vision_lr_mult", "weight_decay", "grad_clip", "pos_embed_std"):
        if not 0 <= getattr(args, name) < float("inf") or (name == "lr" and args.lr == 0):
            parser.error(f"--{name} {getattr(args, name)}: must be a finite number >= 0"
                         + (" (> 0)" if name == "lr" else ""))
    if not 0 < args.beta2 < 1:
        parser.error(f"--beta2 {args.beta2}: must be in (0, 1)")
    if args.cp > 1 and args.seq_len % (128 * args.cp):
        parser.error(f"--seq_len {args.seq_len}: with --cp {args.cp} must be a multiple of 128 x {args.cp} (torch's "
                     "context-parallel block mask takes whole blocks of 128 queries on every rank)")
    if args.preset == "all" and not args.plan:
        parser.error("--preset all: only with --plan (a run trains one size)")
    try:
        args.arch_overrides = parse_arch(args.arch)
        if args.arch and args.preset != "all":         # every value checked now, before anything is written
            Qwen3VLConfig.from_preset(args.preset, **args.arch_overrides)
    except (TypeError, ValueError) as e:
        parser.error(f"--arch {args.arch}: {e}")
    if args.arch and args.init_from:
        parser.error(f"--arch {args.arch} with --init_from: the architecture is the checkpoint's, whose weights were "
                     "trained for it; --arch builds a new model (with --preset)")
    args.stage_list = []
    for item in args.stages.split(","):
        name, _, steps = item.partition(":")
        if not (steps.isascii() and steps.isdigit() and int(steps) > 0):
            parser.error(f"--stages: bad stage {item!r}; use name:steps with steps a positive whole number")
        args.stage_list.append((name, int(steps)))
    return args


def base_stage(name, data):
    """The paper's stage (STAGES) a stage name is a setting of: its own, or the dataset's (the toy recipe's)."""
    return name if name in STAGES else data.stages[name]


def stage_seq_len(name, data, args):
    """Tokens per packed row in stage `name`: --seq_len x the multiplier of its paper stage (long: --long_seq_mult)."""
    mult = STAGES[base_stage(name, data)]["seq_mult"]
    return args.seq_len * (args.long_seq_mult if mult is None else mult)


def check_rows(args, data, cfg):
    """Every stage's rows fit the model's context (text.max_position_embeddings, or what a RoPE scaling extends it
    to): refused before the first step, with the numbers and the flags that set them."""
    for name, _ in args.stage_list:
        n = stage_seq_len(name, data, args)
        if n > cfg.text.context_length:
            scaled = f" ({cfg.text.rope_scaling['rope_type']} RoPE scaling)" if cfg.text.rope_scaling else ""
            raise ValueError(f"--stages {name}: rows of {n} tokens (--seq_len {args.seq_len} x "
                             f"{n // args.seq_len}) are longer than the model's context of "
                             f"{cfg.text.context_length} tokens{scaled}; lower --seq_len (or --long_seq_mult), or "
                             "extend the context in the config (text_config rope_scaling, e.g. YaRN)")


# ----------------------------------------------------------------------------------------------------------
# Data: samples -> processor -> packed rows


class Packer:
    """
    Row r of the run packs whole samples numbered [r*SPAN, (r+1)*SPAN) in the dataset, in order, until the next one
    does not fit (it is dropped). So a row is a pure function of its number: ranks build disjoint rows without
    talking, and resuming needs only the step. A sample that cannot be used (longer than a row, an image that does
    not open) stops the run with its origin named, or with skip_bad is skipped and counted.
    """
    SPAN = 512

    def __init__(self, data, processor, cfg, loss_weighting="token", skip_bad=False):
        self.data, self.processor, self.cfg = data, processor, cfg
        self.loss_weighting, self.skip_bad = loss_weighting, skip_bad
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
        pos, _ = prompt_positions(self.cfg, b["input_ids"], None, b["image_grid_thw"], b["video_grid_thw"],
                                  b["video_second_per_grid"])
        return dict(ids=ids, labels=labels, pos=pos[:, 0], pv=b["pixel_values"], ig=b["image_grid_thw"],
                    pvv=b["pixel_values_videos"], vg=b["video_grid_thw"])

    def usable(self, index, stage, seq_len):
        """Sample `index` encoded for `stage`, or None (counted) when it is bad and skip_bad is set."""
        origin = f"sample {index}"
        try:
            s = self.data.sample(index, stage)
            origin = s["origin"]
            enc = self.encode(s, STAGES[base_stage(stage, self.data)]["loss_on"])
            if len(enc["ids"]) > seq_len:
                raise BadSample(f"{origin}: {len(enc['ids'])} tokens, longer than a row of {seq_len} "
                                "(raise --seq_len or lower --max_pixels)")
            if not (enc["labels"] != -100).any():
                raise BadSample(f"{origin}: no token to learn in stage {stage!r}")
        except (ValueError, OSError) as e:              # BadSample, and what the processor says of bad media
            if self.skip_bad:
                self.skipped += 1
                return None
            raise e if isinstance(e, BadSample) else BadSample(f"{origin}: {e}") from e
        return enc

    def row(self, r, stage, seq_len):
        samples, n = [], 0
        for index in range(r * self.SPAN, (r + 1) * self.SPAN):
            s = self.usable(index, stage, seq_len)
            if s is None:
                continue
            if n + len(s["ids"]) > seq_len:
                break
            samples.append(s)
            n += len(s["ids"])
        return samples

    def batch(self, rows, stage, seq_len):
        return collate([self.row(r, stage, seq_len) for r in rows], seq_len, self.processor.tok.pad_id,
                       self.loss_weighting)


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
        seq_len = stage_seq_len(stage, self.packer.data, a)
        batch = self.packer.batch(range(first, first + a.batch_size), stage, seq_len)
        return dict(batch, skipped=self.packer.skipped - skipped)


def collate(rows, seq_len, pad_id, loss_weighting="token"):
    """Packed rows -> model kwargs (input_ids, document_ids, position_ids [3, B, S], pixels and grids), labels,
    `real` (1 on the samples' tokens, 0 on padding; the MoE load-balancing loss counts only these) and, for
    loss_weighting "sqrt", `weights` [B, S]: each target token of a sample with n targets weighs 1 / sqrt(n)."""
    B = len(rows)
    input_ids = torch.full((B, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((B, seq_len), -100, dtype=torch.long)
    document_ids = torch.zeros(B, seq_len, dtype=torch.long)
    real = torch.zeros(B, seq_len, dtype=torch.long)                           # 1 on samples' tokens, 0 on padding
    weights = torch.zeros(B, seq_len) if loss_weighting == "sqrt" else None    # per token, where sqrt weighting
    position_ids = torch.zeros(3, B, seq_len, dtype=torch.long)
    pv, ig, pvv, vg = [], [], [], []
    for b, row in enumerate(rows):
        n = 0
        for d, s in enumerate(row):
            L = len(s["ids"])
            input_ids[b, n:n + L], labels[b, n:n + L] = s["ids"], s["labels"]
            document_ids[b, n:n + L], position_ids[:, b, n:n + L] = d, s["pos"]
            real[b, n:n + L] = 1
            if weights is not None:
                weights[b, n:n + L] = 1 / math.sqrt(max(1, int((s["labels"] != -100).sum())))
            for lst, key in ((pv, "pv"), (ig, "ig"), (pvv, "pvv"), (vg, "vg")):
                if s[key] is not None:
                    lst.append(s[key])
            n += L
        document_ids[b, n:] = torch.arange(len(row), len(row) + seq_len - n)    # each padding token on its own
    cat = lambda xs: torch.cat(xs) if xs else None
    batch = dict(input_ids=input_ids, labels=labels, real=real, document_ids=document_ids, position_ids=position_ids,
                 pixel_values=cat(pv), image_grid_thw=cat(ig), pixel_values_videos=cat(pvv), video_grid_thw=cat(vg))
    if weights is not None:
        batch["weights"] = weights
    return batch


# ----------------------------------------------------------------------------------------------------------
# Model placement: one device, or FSDP2 shards (torchrun)


def checkpoint_blocks(model):
    """Activation checkpointing: every decoder and ViT block keeps only its input and recomputes the rest in the
    backward (on one device and under FSDP alike; wrapped before sharding)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    for blocks in (model.language_model.layers, model.visual.blocks):
        for i, block in enumerate(blocks):
            blocks[i] = checkpoint_wrapper(block)


def shard(model, mesh):
    """
    FSDP2 the torchtitan way: each decoder block and the whole vision encoder are units of their own, the root
    keeps the embeddings, final norm and (tied) head. Parameters are all-gathered in bf16, gradients reduced in
    fp32; the optimizer sees fp32 shards.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if mesh.device_type == "cuda" else torch.float32,
                              reduce_dtype=torch.float32)
    fully_shard(model.visual, mesh=mesh, mp_policy=mp)
    for layer in model.language_model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)


class ContextParallel:
    """
    Context parallelism (--cp N) with torch's own implementation (torch.distributed.tensor.experimental.
    _context_parallel): keys and values all-gathered, as in "The Llama 3 Herd of Models" (2024, §3.3.2), rather than
    passed round a ring. The N ranks of a group hold the same rows; each computes
    the queries of 1/N of every row's positions, chosen by torch's head-tail load balancer (rank i takes chunks i and
    2N-1-i of 2N, so that every rank has as much causal work), against the keys and values of the whole row: a hook
    on each decoder layer's flex.Attention all-gathers them, and its backward reduce-scatters their gradients. The
    block mask of a rank's queries is torch's rewrite of the row's mask (causal, within each packed document).
    Everything before the decoder (token embeddings, the ViT over the row's images, DeepStack features, 3-D positions,
    shifted targets) is computed for the whole row on each of the N ranks, which then keeps its positions
    (Qwen3VL.forward's context_parallel).
    """

    def __init__(self, model, mesh):
        self.mesh = mesh
        style = _ContextParallel(seq_dim=2, attention_type=_ContextParallel.AttentionType.FLEX)
        for module in model.language_model.modules():
            if isinstance(module, flex.Attention):
                parallelize_module(module, mesh, style)

    def _shard(self, x, dim, S):
        balancer = _HeadTailLoadBalancer(S, self.mesh.size(), self.mesh.device_type)
        return _context_parallel_shard(self.mesh, [x], [dim], balancer)[0]

    def positions(self, S):
        """The positions of a row of S whose queries this rank computes: [S / N] (two chunks of S / 2N)."""
        return self._shard(torch.arange(S, device=self.mesh.device_type)[None], 1, S)[0]

    def shard_mask(self, mask):
        """The row's BlockMask [B, 1, S, S] -> that of this rank's queries against the whole row [B, 1, S / N, S]."""
        return self._shard(mask, 2, mask.seq_lengths[0])


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
    AdamW; matrices and embeddings decay, norms and biases do not; the vision tower can learn at a fraction of the
    rate (--vision_lr_mult: a ViT trained from scratch at the full rate can lose its features before the LLM has
    learned to read them). Its state is created at once for every parameter (torch.distributed.checkpoint does it with one zero-gradient, zero-lr step, so step counters start
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


def lr_at(step, args, post_start):
    """One cosine over the whole run at --lr: the stages change the data, the loss and what is trainable, not the
    schedule (restarting at the peak between them undoes what was learned). Post-training that follows other
    stages (from step post_start) starts a cosine of its own at sft_lr_ratio * --lr, as post-training is a run of
    its own in the paper (sft_lr_ratio 0: the run's cosine goes on)."""
    total = sum(n for _, n in args.stage_list)
    if args.sft_lr_ratio > 0 and 0 < post_start <= step:
        return cosine(step - post_start, total - post_start, args.lr * args.sft_lr_ratio, args)
    return cosine(step, total, args.lr, args)


def post_start(stage_list, data):
    """The step where post-training begins: the first stage whose base stage is post-training (else the end)."""
    step = 0
    for name, n in stage_list:
        if STAGES[base_stage(name, data)]["post"]:
            return step
        step += n
    return step


def stage_of(step, stage_list):
    """The name of the stage a global step belongs to."""
    for name, n in stage_list:
        if step < n:
            return name
        step -= n
    raise ValueError(f"step {step} is past the last stage")


# ----------------------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(out_dir, model, optimizer, tok, processor, step, args, rank):
    """
    out_dir/ckpt-<step>/: dcp/ (model + optimizer, one shard per rank), config.json, tokenizer.tiktoken (and the
    chat template, if the tokenizer has one), the processor's configs (image budgets), train_state.json (step, settings) and rng-<rank>.safetensors, written
    as ckpt-<step>.tmp, then renamed; then out_dir/latest is replaced atomically and all but the newest
    --keep_checkpoints checkpoints are deleted.
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
    save_rng(os.path.join(tmp, f"rng-{rank}.safetensors"))
    barrier()
    if rank == 0:
        write_json(model.cfg.to_hf_dict(ablations=True), os.path.join(tmp, "config.json"))   # with its switches
        tok.save(os.path.join(tmp, "tokenizer.tiktoken"))
        if tok.chat_template is not None:                     # a checkpoint's own template formats its chats
            with open(os.path.join(tmp, "chat_template.jinja"), "w", encoding="utf-8") as f:
                f.write(tok.chat_template)
        processor.save_pretrained(tmp)
        write_json(dict(step=step, args={k: v for k, v in vars(args).items() if k != "stage_list"}),
                   os.path.join(tmp, "train_state.json"))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(os.path.join(out_dir, "latest.tmp"), "w") as f:
            f.write(name)
        os.replace(os.path.join(out_dir, "latest.tmp"), os.path.join(out_dir, "latest"))
        for old in checkpoints(out_dir)[args.keep_checkpoints:]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()


def checkpoints(out_dir):
    """The run's checkpoint folders, newest first."""
    names = [n for n in os.listdir(out_dir) if n.startswith("ckpt-") and n[5:].isdigit()]
    return [os.path.join(out_dir, n) for n in sorted(names, reverse=True)]


def latest_checkpoint(out_dir, say=print):
    """The newest checkpoint of a run that passes verify_checkpoint; an older good one (said) if it does not."""
    if not os.path.isfile(os.path.join(out_dir, "latest")):
        raise FileNotFoundError(f"{out_dir!r}: no checkpoint (no 'latest' file)")
    with open(os.path.join(out_dir, "latest")) as f:
        newest = os.path.join(out_dir, os.path.basename(f.read().strip()))
    problems = []
    for path in [newest] + [c for c in checkpoints(out_dir) if c != newest]:
        try:
            verify_checkpoint(path)
        except (OSError, ValueError, pickle.UnpicklingError) as e:
            problems.append(f"{path}: {e}")
            continue
        if problems:
            say("skipped damaged checkpoint(s): " + "; ".join(problems) + f"; using {path}")
        return path
    raise ValueError(f"{out_dir!r}: no usable checkpoint: " + "; ".join(problems))


def checkpoint_dir(path):
    """A train.py checkpoint given itself or its run's folder (then its latest good one); None for anything else."""
    if os.path.isdir(os.path.join(path, "dcp")):
        return path
    if os.path.isfile(os.path.join(path, "latest")):
        return latest_checkpoint(path, say=lambda *a: print(*a, file=sys.stderr))
    return None


def verify_checkpoint(path):
    """Every file a checkpoint needs is there and whole: its settings and, per the (safely read) metadata of the
    distributed checkpoint, every shard file inside dcp/ at least as long as the data it records."""
    for name in ("config.json", "train_state.json", os.path.join("dcp", ".metadata")):
        if not os.path.isfile(os.path.join(path, name)):
            raise FileNotFoundError(f"{name} is missing")
    with open(os.path.join(path, "train_state.json")) as f:
        step = json.load(f)["step"]
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"train_state.json: bad step {step!r}")
    reader = SafeReader(os.path.join(path, "dcp"))
    ends = {}
    for info in reader.read_metadata().storage_data.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for file, end in ends.items():
        size = os.path.getsize(os.path.join(path, "dcp", file))
        if size < end:
            raise ValueError(f"dcp/{file} is truncated ({size} bytes, {end} recorded)")


class SafeUnpickler(pickle.Unpickler):
    """The distributed checkpoint's metadata is a pickle: read it allowing only the plain classes it is made of
    (its own dataclasses, torch.Size, dtypes, layouts by name, the checkpoint's path), so a crafted file cannot call
    anything else."""
    MODULES = ("torch.distributed.checkpoint.metadata",)
    NAMES = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
             ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
             ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset")}

    def find_class(self, module, name):
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if module in self.MODULES and isinstance(getattr(sys.modules.get(module), name, None), type) \
                or (module, name) in self.NAMES or dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which a checkpoint never holds")


class SafeReader(dcp.FileSystemReader):
    """A FileSystemReader whose metadata is read by SafeUnpickler and whose shard files stay inside the folder."""

    def read_metadata(self, *args, **kwargs):
        from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
        with open(os.path.join(self.path, ".metadata"), "rb") as f:
            metadata = SafeUnpickler(f).load()
        if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
            raise ValueError("dcp/.metadata is not a distributed-checkpoint metadata file")
        for info in metadata.storage_data.values():
            file = getattr(info, "relative_path", None)
            if not isinstance(file, str) or os.path.basename(file) != file or file in ("", ".", ".."):
                raise ValueError(f"dcp/.metadata names the shard file {file!r} outside the checkpoint folder")
        metadata.storage_meta = metadata.storage_meta or StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(dcp.DefaultLoadPlanner):
    """Non-tensor entries (the optimizer's settings) are read as plain data, never as arbitrary pickles."""

    def load_bytes(self, read_item, value):
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element   # (the default planner's own helper)
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def read_dcp(state, path):
    """Fill `state` ({"model": ..., "optim": ...} or a part of it) from a checkpoint's dcp/ folder, safely."""
    from torch.distributed.checkpoint.api import CheckpointException
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    try:
        dcp.load(state, storage_reader=SafeReader(os.path.join(path, "dcp")), planner=SafePlanner())
    except CheckpointException as e:                # (a BaseException): the first rank's error, in one line
        first = next(iter(e.failures.values()))     # (exception, its traceback)
        first = first[0] if isinstance(first, tuple) else first
        raise ValueError(f"{path}: the checkpoint cannot be read: {type(first).__name__}: {first}") from None


def save_rng(path):
    """The RNG states as a safetensors file: torch's (and CUDA's) as tensors, Python's and NumPy's as JSON text."""
    from safetensors.torch import save_file
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda{i}": t for i, t in enumerate(torch.cuda.get_rng_state_all())})
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(keys.astype(np.int64))
    save_file(tensors, path, metadata=dict(python=json.dumps(random.getstate()),
                                           numpy=json.dumps([kind, int(pos), int(has_gauss), float(gauss)])))


def load_rng(path):
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    version, state, gauss = json.loads(meta["python"])
    random.setstate((version, tuple(state), gauss))
    kind, pos, has_gauss, cached = json.loads(meta["numpy"])
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def load_checkpoint(path, model, optimizer, rank):
    """Model, optimizer and RNG from a checkpoint written by any number of ranks; returns its step."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    read_dcp(state, path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_file = os.path.join(path, f"rng-{rank}.safetensors")
    if os.path.isfile(rng_file):              # a run resumed on more ranks than it was saved with starts their RNG anew
        load_rng(rng_file)
    with open(os.path.join(path, "train_state.json")) as f:
        return json.load(f)["step"]


def load_weights(path, model):
    """The model's weights (no optimizer) from a train.py checkpoint, into a plain or a sharded model."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    state = {"model": get_model_state_dict(model)}
    read_dcp(state, path)
    set_model_state_dict(model, state["model"])


def load_trained(path, device="cpu", dtype=None):
    """A model from a train.py checkpoint, on `device` in `dtype` (sample.py and eval.py use this)."""
    with torch.device("meta"):
        model = Qwen3VL(read_hf_config(path))
    model.to_empty(device=device)
    if model.cfg.tie_word_embeddings:
        model.lm_head.weight = model.language_model.embed_tokens.weight
    load_weights(path, model)
    return model.to(dtype=dtype) if dtype else model


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
        plain.save_pretrained(path, processor=processor)      # + tokenizer, template, processor configs
    barrier()


# ----------------------------------------------------------------------------------------------------------
# Evaluation


def plot(out_dir, metrics, stage_list, chance, curve="loss"):
    """<curve>.png (the training loss on a log scale, or another logged number such as RL's mean reward; stages
    marked) and metrics.png (evaluation score per task, its chance level dotted in the same colour)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.transforms import blended_transform_factory
    train = [m for m in metrics if curve in m]
    evals = [m for m in metrics if "eval" in m]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot([m["step"] for m in train], [m[curve] for m in train], lw=1)
    ax.set(xlabel="step", ylabel=f"train {curve}", yscale="log" if curve == "loss" else "linear",
           title=f"training {curve}")
    at = blended_transform_factory(ax.transData, ax.transAxes)
    edge = 0
    for i, (name, n) in enumerate(stage_list):
        ax.axvline(edge, color="gray", ls=":", lw=0.8)
        ax.text(edge, 0.98 - 0.06 * (i % 3), f" {name}", transform=at, va="top", fontsize=8)   # 3 heights: no overlap
        edge += n
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, f"{curve}.png"), dpi=120)
    plt.close(fig)
    if evals:
        tasks = list(evals[-1]["eval"])
        colours = plt.get_cmap("tab20" if len(tasks) > 10 else "tab10")
        fig, ax = plt.subplots(figsize=(9, 4.5))
        for i, task in enumerate(tasks):
            c = colours(i % colours.N)
            seen = [m for m in evals if task in m["eval"]]
            ax.plot([m["step"] for m in seen], [m["eval"][task] for m in seen], marker="o", ms=3, color=c, label=task)
            if chance.get(task) is not None:
                ax.axhline(chance[task], color=c, ls=":", lw=0.8)
        if any(chance.get(t) is not None for t in tasks):
            ax.plot([], [], color="gray", ls=":", lw=0.8, label="chance (same colour)")
        ax.set(xlabel="step", ylabel="evaluation score", ylim=(0, 1.02), title="score per task")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "metrics.png"), dpi=120)
        plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# Memory and FLOPs planner

PEAK_FLOPS = 989e12          # dense bf16 FLOP/s of an H100 / H200: MFU = model FLOPs per second / this


GPU_MEMORY = 141e9      # bytes of one H200 (141 GB), the GPU the plan counts in
LOSS_CHUNK = 1024       # tokens whose logits exist at once in the loss (model.chunked_cross_entropy's chunk_size)


def param_counts(cfg):
    """Parameters of the model of cfg (built on the meta device): all, those of each FSDP unit, those of the ViT, and
    the counts model_flops needs (flop_counts)."""
    with torch.device("meta"):
        model = Qwen3VL(cfg)
    P = model.num_params()
    vit_params = sum(p.numel() for p in model.visual.parameters())
    units = [sum(p.numel() for p in layer.parameters()) for layer in model.language_model.layers]
    return P, units + [vit_params, P - sum(units) - vit_params], vit_params, flop_counts(model)


def flop_counts(model):
    """The matrix parameters (weights of products, not of lookups or norms) a token passes through in the decoder
    (its layers with the MoE's chosen experts only, and the head), a patch in the ViT (patch embedding and blocks)
    and a merged token (the merger and DeepStack mergers)."""
    def matrices(module, keep=lambda name: True):
        return sum(p.numel() for name, m in module.named_modules() if not isinstance(m, torch.nn.Embedding)
                   for p in m.parameters(recurse=False) if p.dim() >= 2 and keep(name))
    idle = model.num_params() - model.num_active_params()                                # experts not chosen
    v = model.visual
    merged = matrices(v, lambda name: is_merger("visual." + name))
    return dict(llm=matrices(model.language_model) + model.lm_head.weight.numel() - idle,
                patch=matrices(v) - merged, merged=merged)


def plan(cfg, seq_len, batch_size, n_gpus, activation_checkpointing, visual_fraction=0.5, cp=1, counts=None):
    """
    Per-GPU memory (bytes) and FLOPs per token of a training step under FSDP2 with bf16 compute, with the sequence
    split over `cp` GPUs (context parallelism; n_gpus counts them all, FSDP shards over all of them).
    Model state (sharded): fp32 parameters 4P, fp32 gradients 4P, AdamW moments 8P, all / n_gpus; plus the
    unsharded bf16 parameters of the two largest units in flight (current and prefetched).
    Activations (bf16, saved for the backward) per token and block, counted tensor by tensor from model.py, for the
    seq_len x batch_size / cp tokens of this GPU: linear in the row length. Attention is FlexAttention over packed
    rows (what a CUDA run uses): it saves q, k, v, its output and the fp32 log-sum-exp of each head, and no [S, S]
    mask or score matrix (the dense path, on the CPU, would add a [B, S, S] mask). With checkpointing only each
    block's input is kept plus one block's worth being recomputed. With cp > 1 one layer's K and V of the whole row
    are gathered during its attention. The loss is chunked (model.chunked_cross_entropy): the final hidden states
    are kept and LOSS_CHUNK tokens' logits exist at once (bf16 head output, fp32 logits and their gradient), never
    the [S, V] logits. counts: param_counts(cfg), when already known.
    """
    t, v = cfg.text, cfg.vision
    P, units, vit_params, fc = counts or param_counts(cfg)
    state = 16 * P / n_gpus + 2 * 2 * sorted(units)[-1] + 2 * 2 * sorted(units)[-2]
    tokens = seq_len * batch_size / cp                            # this GPU's share of the rows
    H, I, q, kv = t.hidden_size, t.intermediate_size if t.num_experts == 0 else t.moe_intermediate_size * t.num_experts_per_tok, \
        t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    # LLM block, bytes per token (bf16): input, norm out, q/k/v (+ normed/rotated q,k), attention out, residual,
    # norm out, gate/up/silu/product, plus fp32 norm statistics and the attention's fp32 log-sum-exp per head
    llm = 2 * (H + H + 2 * q + 4 * kv + q + H + H + 4 * I) + 4 * 4 + 4 * t.num_attention_heads
    D, Iv = v.hidden_size, v.intermediate_size
    vit = 2 * (D + D + 3 * D + 2 * D + D + D + D + 2 * Iv)       # per patch
    patches = 4 * visual_fraction * tokens                        # 4 patches per visual token (2x2 merge)
    full = tokens * llm * t.num_hidden_layers + patches * vit * v.depth
    kept = tokens * 2 * H * t.num_hidden_layers + patches * 2 * D * v.depth + tokens * llm + patches * vit
    gathered_kv = 2 * 2 * kv * seq_len * batch_size if cp > 1 else 0
    loss = tokens * 2 * H + min(LOSS_CHUNK, tokens) * t.vocab_size * (2 + 4 + 4)
    acts = (kept if activation_checkpointing else full) + gathered_kv + loss
    # FLOPs: one document filling each row (the most attention a row can cost; a packed row costs less), its visual
    # tokens in images of 1024 patches (512 x 512 pixels)
    frames = [1024] * round(patches / 1024)
    flops = model_flops(cfg, fc, tokens, [seq_len] * batch_size, frames) / tokens
    return dict(params=P, state=state, activations=acts, total=state + acts, flops_per_token=flops)


def model_flops(cfg, fc, tokens, lengths, frames):
    """
    Forward + backward FLOPs of a training step (the MFU's numerator; fc: flop_counts): 6 x the parameters each token,
    patch and merged token passes through, and attention, 12 x width for each (query, key) pair a layer scores (QK^T
    and PV, 2 FLOPs a multiply-add, x 3 with the backward): in the decoder within each document (`lengths`: the rows'
    runs of document_ids, padding included), causal, n (n + 1) / 2 pairs; in the ViT within each frame group
    (`frames`: patches of each), all n^2 pairs. Work on pairs a mask hides is not counted.
    """
    t, v = cfg.text, cfg.vision
    patches = sum(frames)
    dense = 6 * (fc["llm"] * tokens + fc["patch"] * patches + fc["merged"] * patches // v.spatial_merge_size ** 2)
    llm_pairs = sum(n * (n + 1) // 2 for n in lengths)
    vit_pairs = sum(n * n for n in frames)
    return dense + 12 * (t.num_attention_heads * t.head_dim * t.num_hidden_layers * llm_pairs
                         + v.hidden_size * v.depth * vit_pairs)


def frame_sizes(batch):
    """The patches of each frame group the ViT attends within, for a micro-batch's image and video grids."""
    return [int(h * w) for key in ("image_grid_thw", "video_grid_thw") if batch.get(key) is not None
            for t, h, w in batch[key].tolist() for _ in range(t)]


def document_lengths(document_ids):
    """[B, S] document ids of packed rows -> the length of every document (each row's runs of one id)."""
    return [n for row in document_ids for n in torch.unique_consecutive(row, return_counts=True)[1].tolist()]


def gpus_for_row(cfg, seq_len, visual_fraction=0.5, memory=GPU_MEMORY, most=4096, counts=None):
    """The fewest GPUs (a power of two) that train one row of seq_len tokens with activation checkpointing, FSDP and
    the row split over all of them (cp = n_gpus), each within `memory` bytes; None if more than `most`."""
    n, counts = 1, counts or param_counts(cfg)
    while n <= most:
        if plan(cfg, seq_len, 1, n, True, visual_fraction, cp=n, counts=counts)["total"] <= memory:
            return n
        n *= 2
    return None


def print_plan(args):
    """The plan of --init_from's config or of --preset ('all': every released size)."""
    if args.n_gpus % args.cp:
        raise ValueError(f"--cp {args.cp}: must divide --n_gpus {args.n_gpus} (the row is split over cp of the GPUs)")
    if args.init_from:
        configs = {args.init_from: read_hf_config(args.init_from)}
    elif args.preset == "all":
        configs = {n: Qwen3VLConfig.from_preset(n) for n in PRESETS if n.startswith("qwen3-vl-")}
    else:
        configs = {args.preset: Qwen3VLConfig.from_preset(args.preset, **args.arch_overrides)}
    print(f"seq_len {args.seq_len}, batch {args.batch_size} per GPU, {args.n_gpus} GPUs (context parallel over "
          f"{args.cp}), FSDP2 bf16, AdamW; {args.visual_fraction:.0%} visual tokens; FlexAttention over packed rows, "
          f"chunked loss. GPUs/row: {GPU_MEMORY / 1e9:.0f} GB GPUs that one row of seq_len needs with checkpointing, "
          "FSDP and the row split over all of them")
    print(f"{'model':>20s} {'params':>9s} {'state/GPU':>10s} {'acts/GPU':>9s} {'acts+AC':>9s} {'total/GPU':>10s} "
          f"{'TFLOP/tok':>10s} {'GPUs/row':>9s}")
    for name, c in configs.items():
        counts = param_counts(c)
        a = plan(c, args.seq_len, args.batch_size, args.n_gpus, False, args.visual_fraction, args.cp, counts)
        b = plan(c, args.seq_len, args.batch_size, args.n_gpus, True, args.visual_fraction, args.cp, counts)
        tot = b["total"] if args.activation_checkpointing else a["total"]
        n = gpus_for_row(c, args.seq_len, args.visual_fraction, counts=counts)
        print(f"{name:>20s} {a['params'] / 1e9:8.2f}B {a['state'] / 2**30:9.1f}G {a['activations'] / 2**30:8.1f}G "
              f"{b['activations'] / 2**30:8.1f}G {tot / 2**30:9.1f}G {a['flops_per_token'] / 1e12:10.4f} "
              f"{n or '>4096':>9}")


# ----------------------------------------------------------------------------------------------------------
# Main


def barrier():
    if dist.is_initialized():
        dist.barrier()


def main(argv=None):
    """The run as a list of steps: everything is checked and set up before the first file is written."""
    args = parse_args(argv)
    if args.plan:
        return print_plan(args)
    run = Run(args)
    data, eval_data, test_data = open_datasets(args)
    resume = checkpoint_to_resume(args, run.say)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    tok, cfg, start = tokenizer_and_config(args, data, resume, run.say)
    check_rows(args, data, cfg)
    model = build_model(args, cfg, start, resume, run)
    processor = make_processor(args, start or resume, tok, data, cfg)
    packer = Packer(data, processor, cfg, args.loss_weighting, args.skip_bad_samples)
    first = args.stage_list[0][0]
    if not packer.row(0, first, stage_seq_len(first, data, args)):
        raise BadSample(f"no sample fits a row of --seq_len {args.seq_len}: nothing to train on")
    os.makedirs(args.out_dir, exist_ok=True)
    run.say(f"writing to {os.path.abspath(args.out_dir)}")
    optimizer = make_optimizer(model, args, run.device)
    step, metrics = 0, []
    if resume:
        step = load_checkpoint(resume, model, optimizer, run.rank)
        metrics = logged_metrics(args.out_dir, step)
        run.say(f"resumed from {resume} at step {step}")
    train(args, run, model, optimizer, tok, processor, packer, eval_data, step, metrics)
    scores = finish(args, run, model, tok, processor, test_data, packer)
    if run.distributed:
        dist.destroy_process_group()
    return scores


def checkpoint_to_resume(args, say):
    """--resume: out_dir's latest good checkpoint. Otherwise None, and an out_dir that holds a run is refused unless
    --overwrite."""
    if args.resume:
        return latest_checkpoint(args.out_dir, say)
    if not args.overwrite and os.path.isfile(os.path.join(args.out_dir, "latest")):
        raise FileExistsError(f"--out_dir {args.out_dir!r} holds a run; --resume it, choose another --out_dir, or "
                              "--overwrite it")
    return None


def logged_metrics(out_dir, step):
    """The metrics a resumed run keeps: those logged up to its checkpoint's step (later ones are logged again)."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [m for m in map(json.loads, f) if m["step"] <= step]


class Run:
    """Where the run computes: rank, number of ranks, device, compute dtype, autocast, the FSDP mesh (all ranks) and
    with --cp N the context-parallel mesh (N consecutive ranks share rows: data-parallel rank dp_rank of dp_size) and
    the ContextParallel that build_model makes on it (cp; None without --cp)."""

    def __init__(self, args):
        self.distributed = "RANK" in os.environ
        self.mesh = self.cp_mesh = self.cp = None
        if self.distributed:
            use_cuda = torch.cuda.is_available() and args.device in ("auto", "cuda")
            dist.init_process_group("nccl" if use_cuda else "gloo")
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
            self.device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if use_cuda else torch.device("cpu")
            if use_cuda:
                torch.cuda.set_device(self.device)
            from torch.distributed.device_mesh import init_device_mesh
            self.mesh = init_device_mesh(self.device.type, (self.world_size,))
        else:
            self.rank, self.world_size = 0, 1
            self.device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                                       "cpu" if args.device == "auto" else args.device)
        check_cp(args.cp, self.world_size, self.device)
        if args.cp > 1:
            from torch.distributed.device_mesh import init_device_mesh
            self.cp_mesh = init_device_mesh(self.device.type, (self.world_size // args.cp, args.cp),
                                            mesh_dim_names=("dp", "cp"))["cp"]
        self.dp_rank, self.dp_size = self.rank // args.cp, self.world_size // args.cp
        self.dtype = {"auto": torch.bfloat16 if self.device.type == "cuda" else torch.float32,
                      "bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
        # FSDP casts parameters itself; a single device uses autocast
        self.autocast = torch.autocast(self.device.type, dtype=self.dtype) \
            if self.dtype != torch.float32 and not self.distributed else nullcontext()

    def say(self, *a, **k):
        if self.rank == 0:
            print(*a, **k)


def check_cp(cp, world_size, device):
    """--cp's conditions on the ranks: a divisor of their number, on GPUs."""
    if cp > 1 and world_size % cp:
        raise ValueError(f"--cp {cp}: must divide the number of ranks, {world_size} (torchrun --nproc_per_node "
                         f"a multiple of {cp})")
    if cp > 1 and device.type != "cuda":
        raise ValueError(f"--cp {cp}: context parallelism runs the decoder's attention as FlexAttention, whose "
                         f"backward torch {torch.__version__.split('+')[0]} computes only on CUDA, not {device.type}")


def open_datasets(args):
    """The training data and the evaluation sets (JSONL files are checked line by line here), and the stage names."""
    data = open_data(args.data, "train", args.seed, args.image_size, skip_bad=args.skip_bad_samples)
    for name, _ in args.stage_list:
        if name not in STAGES and name not in data.stages:
            raise ValueError(f"--stages: unknown stage {name!r}; known: {list(STAGES) + list(data.stages)}")
    own = args.data if data.splits else ""          # a generator with splits (the toy world) scores its own val/test
    eval_spec = args.eval_data or own
    test_spec = args.test_data or (own if not args.eval_data else eval_spec)
    tasks = args.eval_tasks.split(",") if args.eval_tasks else None
    eval_data = (open_data(eval_spec, "val", args.seed, args.image_size, strict=False, tasks=tasks)
                 if eval_spec else None)
    test_data = (open_data(test_spec, "test", args.seed, args.image_size, strict=False, tasks=tasks)
                 if test_spec else None)
    if test_data is not None and test_data.splits and not args.test_samples:
        test_data = None                            # a generator has no "all": --test_samples 0 means no test
    return data, eval_data, test_data


def tokenizer_and_config(args, data, resume, say):
    """The tokenizer and model config: the resumed checkpoint's, --init_from's, or a preset's with the real Qwen
    vocabulary (a toy preset on toy data: a new BPE on the world's text). Also returns --init_from's checkpoint
    folder (a train.py checkpoint or a Hugging Face directory), or None."""
    if resume:
        cfg = read_hf_config(resume)
        for key, value in flat_arch(args.arch_overrides).items():
            if get_field(cfg, key) != value:
                raise ValueError(f"--arch {key}={value!r}: the resumed checkpoint {resume!r} has "
                                 f"{key}={get_field(cfg, key)!r}; a run resumes with its own architecture")
        return Tokenizer.from_pretrained(resume), cfg, None
    if args.init_from:
        try:
            start = checkpoint_dir(args.init_from) or args.init_from
            cfg, tok = read_hf_config(start), Tokenizer.from_pretrained(args.tokenizer or start)
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"--init_from {args.init_from!r}: {e}") from e
        if tok.n_vocab > cfg.text.vocab_size or tok.image_token_id != cfg.image_token_id:
            raise ValueError(f"--init_from {args.init_from!r}: its tokenizer ({tok.n_vocab} tokens, image token "
                             f"{tok.image_token_id}) does not fit its model (vocab {cfg.text.vocab_size}, image "
                             f"token {cfg.image_token_id})")
        return tok, cfg, start
    if args.preset.startswith("qwen3-vl-"):  # a released size from scratch: the real vocabulary at its real ids
        tok = Tokenizer.from_pretrained(args.tokenizer or None)
        cfg = Qwen3VLConfig.from_preset(args.preset, **args.arch_overrides)
        if tok.image_token_id != cfg.image_token_id:
            raise ValueError(f"--tokenizer puts <|image_pad|> at {tok.image_token_id}, {args.preset} at "
                             f"{cfg.image_token_id}")
        return tok, cfg, None
    # a toy size: the given tokenizer, a BPE trained on the toy world's text and the chat template's words (else
    # "assistant" costs six tokens in every sample), or the real one; vocabulary rounded up to a multiple of 64
    if args.tokenizer:
        tok = Tokenizer.from_pretrained(args.tokenizer)
    elif hasattr(data, "text_corpus"):
        t0 = time.time()
        tok = Tokenizer.train((f"user\n{t}\nassistant\n" for t in data.text_corpus(4000)), args.vocab_size)
        say(f"trained a {tok.n_vocab}-token BPE on the toy world in {time.time() - t0:.1f}s")
    else:
        tok = Tokenizer.from_pretrained(None)
    arch = dict(args.arch_overrides)
    text = {**arch.pop("text", {}), "vocab_size": 64 * math.ceil(tok.n_vocab / 64)}
    cfg = Qwen3VLConfig.from_preset(
        args.preset, text=text, **arch,
        image_token_id=tok.image_token_id, video_token_id=tok.video_token_id,
        vision_start_token_id=tok.vision_start_id, vision_end_token_id=tok.vision_end_id)
    return tok, cfg, None


def build_model(args, cfg, start, resume, run):
    """Built on the meta device, placed (and sharded), then initialised or loaded tensor by tensor (a resumed run
    loads every tensor from its checkpoint later, with the optimizer)."""
    with torch.device("meta"):
        model = Qwen3VL(cfg)
    if args.activation_checkpointing:
        checkpoint_blocks(model)
    if run.distributed:
        shard(model, run.mesh)
    if run.cp_mesh is not None:
        run.cp = ContextParallel(model, run.cp_mesh)
    model.to_empty(device=run.device)
    if cfg.tie_word_embeddings and not run.distributed:
        model.lm_head.weight = model.language_model.embed_tokens.weight
    if start and not resume:
        try:
            if os.path.isdir(os.path.join(start, "dcp")):
                load_weights(start, model)
            else:
                fill(model, Qwen3VL.checkpoint_tensors(model, start))
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"--init_from {args.init_from!r}: {e}") from e
    elif not resume:
        # every tensor at the reference's initializer_range (0.02) except the ViT's position table (--pos_embed_std)
        stds = {"visual.pos_embed.weight": args.pos_embed_std}
        names = (plain_name(n) for n, _ in model.named_parameters())       # the same draws with checkpointing
        fill(model, ((n, Qwen3VL.initial_value(n, p.shape, args.seed, stds.get(n, 0.02)))
                     for n, p in zip(names, model.parameters())))
    n_vit = sum(p.numel() for p in model.visual.parameters())
    run.say(f"model: {cfg.text.num_hidden_layers} x {cfg.text.hidden_size} LLM + {cfg.vision.depth} x "
            f"{cfg.vision.hidden_size} ViT, {model.num_params():,} parameters ({n_vit:,} in the ViT); "
            f"{run.world_size} x {run.device.type}, compute {run.dtype}{', FSDP2' if run.distributed else ''}"
            f"{f', context parallel {args.cp}' if run.cp else ''}")
    return model


def make_processor(args, checkpoint, tok, data, cfg):
    """The processor: the checkpoint's (its image pixel budgets), else one for the dataset's images (the toy world's
    budgets follow its image size; a file's: the released processor's); --min/max_pixels replace the budgets. Videos
    are written as the model config's video_time says."""
    budgets = {k: v for k, v in (("min_pixels", args.min_pixels), ("max_pixels", args.max_pixels)) if v}
    if checkpoint:
        return Processor.from_pretrained(checkpoint, tok, **budgets, video_time=cfg.video_time)
    return Processor(tok, **{**data.budgets, **budgets}, video_time=cfg.video_time)


def train(args, run, model, optimizer, tok, processor, packer, eval_data, step, metrics):
    """The loop: every --eval_every steps evaluate, plot and checkpoint; a step is grad_accum micro-steps."""
    say, device, cfg = run.say, run.device, model.cfg
    if run.rank == 0:
        with open(os.path.join(args.out_dir, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(m) + "\n" for m in metrics)
    train_model = torch.compile(model) if args.compile else model
    data = MicroBatches(packer, args, run.dp_rank, run.dp_size)          # the ranks of a CP group share rows
    loader = iter(torch.utils.data.DataLoader(data, batch_size=None, num_workers=args.data_workers,
                                              sampler=range(step * args.grad_accum, len(data)),
                                              prefetch_factor=4 if args.data_workers else None))
    skipped = 0
    total_steps = sum(n for _, n in args.stage_list)
    restart = post_start(args.stage_list, packer.data)
    planned = plan(cfg, args.seq_len, args.batch_size, run.world_size, args.activation_checkpointing)
    say(f"plan: {planned['total'] / 2**30:.1f} GiB per GPU ({planned['state'] / 2**30:.1f} model state, "
        f"{planned['activations'] / 2**30:.1f} activations), {planned['flops_per_token'] / 1e9:.2f} GFLOP per "
        "token (at most)")
    fc = param_counts(cfg)[3]              # MFU: each step's FLOPs from its rows' documents and frames (model_flops)
    peak = PEAK_FLOPS if device.type == "cuda" else None
    log = open(os.path.join(args.out_dir, "metrics.jsonl"), "a", buffering=1) if run.rank == 0 else None   # by line
    t_start, tokens_run = time.time(), 0

    model.train()
    while True:
        last_step = step == total_steps
        if step > 0 and ((args.eval_every and step % args.eval_every == 0) or last_step):
            if eval_data is not None and args.eval_samples:
                results, _ = evaluate(model, processor, eval_data, args.eval_samples, device, run.autocast,
                                      args.max_new_tokens)
                metrics.append(dict(step=step, eval={t: r["score"] for t, r in results.items()}))
                if run.rank == 0:
                    log.write(json.dumps(metrics[-1]) + "\n")
                    log.flush()
                say("eval  " + "  ".join(f"{k} {v:.2f}" for k, v in metrics[-1]["eval"].items()))
            if run.rank == 0:
                plot(args.out_dir, metrics, args.stage_list, eval_data.chance if eval_data else {})
            save_checkpoint(args.out_dir, model, optimizer, tok, processor, step, args, run.rank)
        if last_step:
            break

        stage = stage_of(step, args.stage_list)
        base = STAGES[base_stage(stage, packer.data)]
        set_trainable(model, base["trainable"])
        lr = lr_at(step, args, restart)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        t0 = time.time()
        seq_len = stage_seq_len(stage, packer.data, args)
        rows_per_step = args.batch_size * args.grad_accum * run.dp_size
        micro = [next(loader) for _ in range(args.grad_accum)]          # this rank's micro-batches of the step
        flops = run.dp_size * sum(model_flops(cfg, fc, b["input_ids"].numel(), document_lengths(b["document_ids"]),
                                              frame_sizes(b)) for b in micro)
        skipped += sum(b.pop("skipped") for b in micro)
        # the step's loss is the mean over all its target tokens (weighted: a weighted mean), on every rank and
        # micro-step
        norm = torch.tensor(float(sum(target_weight(b) for b in micro)), device=device)
        if run.distributed:
            dist.all_reduce(norm)
            norm = norm / args.cp                                       # each row was counted by its N CP ranks
        loss_sum = torch.zeros((), device=device)
        for b in micro:
            b = {k: v.to(device) for k, v in b.items() if v is not None}
            labels, real, weights = b.pop("labels"), b.pop("real"), b.pop("weights", None)
            with run.autocast:                 # the summed (weighted) loss, chunk by chunk: no [B, S, V] logits
                _, loss = train_model(**b, labels=labels, loss_weights=weights, loss_reduction="sum",
                                      return_hidden=True, run_vision=run.distributed, context_parallel=run.cp)
            loss = loss / norm
            if cfg.text.num_experts:           # MoE: + coef x Switch load-balancing loss of this micro-step
                loss = loss + cfg.text.router_aux_loss_coef / args.grad_accum * load_balancing_loss(
                    model.router_logits, cfg.text.num_experts_per_tok,
                    real if run.cp is None else real[:, run.cp.positions(seq_len)])
            (loss * run.world_size).backward()  # FSDP averages gradients over ranks: undo it, the loss is global
            loss_sum += loss.detach()
        if run.distributed:
            dist.all_reduce(loss_sum)
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss_value = loss_sum.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"the loss became {loss_value} at step {step} (stage {stage}, lr {lr:.2e}); "
                                     f"stopped without saving: the last good checkpoint in {args.out_dir} stays "
                                     "(--resume from it, perhaps with a lower --lr)")
        dt = time.time() - t0
        tokens = rows_per_step * seq_len
        tokens_run += tokens
        metrics.append(dict(step=step, stage=stage, loss=loss_value, lr=lr))
        if run.rank == 0:
            log.write(json.dumps(metrics[-1]) + "\n")
        if step % args.log_every == 0 or step == 1:
            tps = tokens / dt
            gpu_stats = ""
            if peak:                           # the peak memory of every GPU (all ranks take part in the gather)
                mem = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30], device=device)
                mems = [mem]
                if run.distributed:
                    mems = [torch.empty_like(mem) for _ in range(run.world_size)]
                    dist.all_gather(mems, mem)
                gpu_stats = f" | MFU {100 * flops / dt / (peak * run.world_size):.1f}% | peak mem " \
                            f"{'/'.join(f'{m.item():.1f}' for m in mems)} GiB"
            eta = (time.time() - t_start) / tokens_run * tokens * (total_steps - step)
            say(f"step {step:5d}/{total_steps} | {stage:8s} | loss {loss_value:.4f} | lr {lr:.2e} | "
                f"{1000 * dt:.0f} ms | {tps:,.0f} tok/s{gpu_stats} | ETA {eta / 60:.1f} min", flush=True)
    if run.rank == 0:
        log.close()
    if skipped:
        say(f"{skipped} samples skipped (unusable or longer than a row)")


def target_weight(batch):
    """The total weight of a micro-batch's targets: their count, or the sum of their sqrt weights."""
    targets = batch["labels"][:, 1:] != -100
    return targets.sum() if "weights" not in batch else batch["weights"][:, :-1][targets].sum()


def finish(args, run, model, tok, processor, test_data, packer):
    """The final evaluation, a Hugging Face export and (for grounding answers) one answer drawn on its image."""
    say = run.say
    results, examples = {}, {}
    if test_data is not None:
        results, examples = evaluate(model, processor, test_data, args.test_samples or None, run.device,
                                     run.autocast, args.max_new_tokens)
    ablations = model.cfg.ablations()
    if not ablations:          # an ablated architecture is not the one transformers runs (Qwen3VLConfig.to_hf_dict)
        export_hf(model, tok, processor, os.path.join(args.out_dir, "hf"), run.rank, getattr(torch, args.export_dtype))
    if run.rank == 0:
        written = ["loss.png", "metrics.jsonl"] + ([] if ablations else ["hf/ (Hugging Face export)"])
        if ablations:
            say(f"no Hugging Face export: the model ablates {ablations} (its checkpoints load in sample.py, eval.py)")
        if os.path.exists(os.path.join(args.out_dir, "metrics.png")):
            written.append("metrics.png")
        if results:
            say("\n" + report(results, f"test ({args.test_samples or 'all'} per task)"))
            write_json(results, os.path.join(args.out_dir, "test_scores.json"))
            written.append("test_scores.json")
        drawn = draw_example(examples, os.path.join(args.out_dir, "sample.png"))
        if drawn:
            say(f"\nsample: {drawn[0]}\n  model: {drawn[1]}\n  truth: {drawn[2]}")
            written.append("sample.png")
        say(f"wrote {args.out_dir}/: {', '.join(written)}; {packer.skipped} samples skipped")
    return {t: r["score"] for t, r in results.items()}


def draw_example(examples, path):
    """The first evaluated reply that holds a box or point, drawn onto its image: (question, reply, truth)."""
    from processor import draw_grounding, parse_grounding
    for task, (s, reply) in examples.items():
        image = next((c.get("image") for m in s["prompt"] for c in m["content"] if isinstance(c, dict) and
                      c.get("type") == "image"), None) if not isinstance(s["prompt"][0]["content"], str) else None
        if image is None or ("bbox_2d" not in s["answer"] and "point_2d" not in s["answer"]):
            continue
        try:
            items = parse_grounding(reply)
        except ValueError:
            items = []
        from processor import load_image
        draw_grounding(load_image(image).resize((256, 256)), items, path)
        return s.get("question", task), reply, s["answer"]
    return None


def cli(main):
    """Run a script's main() as a command: a user's mistake (bad data, flags, files, paths; a loss that became NaN)
    ends in one line naming it, not a traceback (--debug shows the traceback). train.py, rl.py and distill.py."""
    try:
        main()
    except (BadSample, FileNotFoundError, FileExistsError, FloatingPointError, ValueError, TypeError) as e:
        if "--debug" in sys.argv:
            raise
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    cli(main)
