"""
Train Qwen3-VL: the paper's recipe as settings of one training loop (Qwen3-VL Technical Report §3.1, §4.1).

    python train.py                                   # toy-cpu on the toy world: every stage, eval, sample, plots
    python train.py --preset toy-gpu --device cuda --batch_size 32 --seq_len 512
    python train.py --init_from path/to/Qwen3-VL-2B-Instruct --stages sft:500 --lr 1e-5
    python train.py --out_dir out/toy --resume        # continue exactly where a stopped run left off

Stages (`--stages name:steps,...`, run in order):
    align     stage 0: only the mergers learn (ViT and LLM frozen), on image captions
    pretrain  stage 1: all weights, every task, next-token loss on every text token
    long      stage 2: all weights, rows of 2x seq_len packed with more long (video, multi-image) samples
    sft       chat-formatted data, loss on the assistant's tokens only

Every row packs several samples; attention never crosses samples (`document_ids`) and each sample's 3-D
positions start at 0. AdamW with decay groups, per-stage warmup + cosine schedule, global-norm clipping,
bf16 autocast on GPU, gradient accumulation. Checkpoints (model as a Hugging Face directory + optimizer, step,
data position, RNG states and the run config) are written atomically: a kill during a save leaves the
previous checkpoint as `latest`.
"""
import argparse
import json
import math
import os
import random
import shutil
import sys
import time

import numpy as np
import torch

from model import Qwen3VL, Qwen3VLConfig
from processor import Processor
from tokenizer import Tokenizer

# ----------------------------------------------------------------------------------------------------------
# Run settings

STAGES = {   # name -> (task mix of the toy world, trainable part, tokens that carry loss, row length multiplier)
    "align": dict(mix="align", trainable="mergers", loss_on="assistant", seq_mult=1),
    "pretrain": dict(mix="all", trainable="all", loss_on="text", seq_mult=1),
    "long": dict(mix="long", trainable="all", loss_on="text", seq_mult=2),
    "sft": dict(mix="all", trainable="all", loss_on="assistant", seq_mult=1),
}


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    # model
    p.add_argument("--preset", default="toy-cpu", help="model size (model.PRESETS); ignored with --init_from")
    p.add_argument("--init_from", default="", help="a Hugging Face Qwen3-VL directory (weights + tokenizer) to start from")
    p.add_argument("--vocab_size", type=int, default=1024, help="size of the BPE trained on the toy world (no --init_from)")
    # data
    p.add_argument("--image_size", type=int, default=64, help="toy world image side in pixels")
    p.add_argument("--stages", default="align:60,pretrain:420,long:60,sft:240", help="name:steps,... in order")
    p.add_argument("--batch_size", type=int, default=8, help="packed rows per micro-step")
    p.add_argument("--seq_len", type=int, default=192, help="tokens per packed row (x2 in the long stage)")
    p.add_argument("--grad_accum", type=int, default=1, help="micro-steps per optimizer step")
    # optimisation
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--min_lr_ratio", type=float, default=0.1, help="cosine floor as a fraction of the peak")
    p.add_argument("--warmup", type=int, default=30, help="warmup steps at the start of each stage")
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--beta2", type=float, default=0.95)
    p.add_argument("--grad_clip", type=float, default=1.0, help="global gradient norm limit (0: off)")
    # evaluation, logging, checkpoints
    p.add_argument("--eval_every", type=int, default=200, help="steps between evaluations (and checkpoints)")
    p.add_argument("--eval_samples", type=int, default=24, help="validation samples per task")
    p.add_argument("--test_samples", type=int, default=64, help="test samples per task in the final evaluation")
    p.add_argument("--log_every", type=int, default=10)
    p.add_argument("--out_dir", default="out/toy")
    p.add_argument("--resume", action="store_true", help="continue from out_dir's latest checkpoint")
    p.add_argument("--config", default="", help="a JSON file of these settings (command-line flags win)")
    # system
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available)")
    p.add_argument("--dtype", default="auto", help="autocast dtype: bfloat16 or float32 (auto: bf16 on cuda)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--seed", type=int, default=0)
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
    stages = []
    for item in args.stages.split(","):
        name, _, steps = item.partition(":")
        if name not in STAGES or not steps.isdigit():
            raise SystemExit(f"error: bad stage {item!r}; use name:steps with name in {list(STAGES)}")
        stages.append((name, int(steps)))
    args.stage_list = stages
    return args


# ----------------------------------------------------------------------------------------------------------
# Data: toy-world samples -> processor -> packed rows


class Packer:
    """
    Fills rows of `seq_len` tokens with whole samples, in order of the train split's index. Each row carries
    `document_ids` (attention stays inside a sample), 3-D `position_ids` restarting at every sample, and labels
    on the stage's tokens. `index` is the data position saved in checkpoints; samples that do not fit an empty
    row are skipped (counted in `skipped`).
    """

    def __init__(self, world, processor, model, index=0):
        self.world, self.processor, self.model = world, processor, model
        self.index, self.skipped, self.pending = index, 0, None

    def encode(self, sample, loss_on):
        b = self.processor([sample["messages"]])
        ids = b["input_ids"][0]                                                  # [L]
        if loss_on == "assistant":
            labels = b["labels"][0]
        else:   # every text token; visual placeholders carry no next-token target
            tok = self.processor.tok
            labels = ids.masked_fill((ids == tok.image_token_id) | (ids == tok.video_token_id), -100)
        labels = labels.clone()
        labels[0] = -100                                                         # nothing predicts a sample's first token
        pos, _ = self.model.get_position_ids(b["input_ids"], None, b["image_grid_thw"], b["video_grid_thw"])
        return dict(ids=ids, labels=labels, pos=pos[:, 0], pv=b["pixel_values"], ig=b["image_grid_thw"],
                    pvv=b["pixel_values_videos"], vg=b["video_grid_thw"])

    def next_batch(self, stage, batch_size, seq_len):
        from data.toyworld import MIXES
        mix = MIXES[STAGES[stage]["mix"]]
        rows = []
        while len(rows) < batch_size:
            row, n = [], 0
            while True:
                if self.pending is None:
                    s = self.world.sample("train", self.index, mix=mix)
                    self.index += 1
                    self.pending = self.encode(s, STAGES[stage]["loss_on"])
                L = len(self.pending["ids"])
                if L > seq_len:
                    self.skipped += 1
                    self.pending = None
                    continue
                if n + L > seq_len:
                    break
                row.append(self.pending)
                n += L
                self.pending = None
            rows.append(row)
        return collate(rows, seq_len, self.processor.tok.pad_id)


def collate(rows, seq_len, pad_id):
    B = len(rows)
    input_ids = torch.full((B, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((B, seq_len), -100, dtype=torch.long)
    document_ids = torch.full((B, seq_len), -1, dtype=torch.long)               # padding: its own document
    position_ids = torch.zeros(3, B, seq_len, dtype=torch.long)
    pv, ig, pvv, vg = [], [], [], []
    for b, row in enumerate(rows):
        n = 0
        for d, s in enumerate(row):
            L = len(s["ids"])
            input_ids[b, n:n + L], labels[b, n:n + L] = s["ids"], s["labels"]
            document_ids[b, n:n + L], position_ids[:, b, n:n + L] = d, s["pos"]
            for lst, key in ((pv, "pv"), (ig, "ig"), (pvv, "pvv"), (vg, "vg")):
                if s[key] is not None:
                    lst.append(s[key])
            n += L
        document_ids[b, n:] = torch.arange(len(row), len(row) + seq_len - n)    # each pad token alone
    cat = lambda xs: torch.cat(xs) if xs else None
    return dict(input_ids=input_ids, labels=labels, document_ids=document_ids, position_ids=position_ids,
                pixel_values=cat(pv), image_grid_thw=cat(ig), pixel_values_videos=cat(pvv), video_grid_thw=cat(vg))


# ----------------------------------------------------------------------------------------------------------
# Optimiser and schedule


def set_trainable(model, part):
    """'mergers': only the ViT's merger and DeepStack mergers learn (stage 0); 'all': everything."""
    for name, p in model.named_parameters():
        p.requires_grad = part == "all" or name.startswith(("visual.merger.", "visual.deepstack_merger_list."))


def make_optimizer(model, args, device):
    """AdamW; matrices and embeddings decay, norms and biases do not."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [dict(params=decay, weight_decay=args.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, args.beta2), eps=1e-8, fused=device.type == "cuda")


def lr_at(step_in_stage, stage_steps, args):
    """Linear warmup, then cosine from the peak to min_lr_ratio * peak, restarted at every stage."""
    warmup = min(args.warmup, max(1, stage_steps // 10))
    if step_in_stage < warmup:
        return args.lr * (step_in_stage + 1) / warmup
    progress = (step_in_stage - warmup) / max(1, stage_steps - warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def stage_of(step, stage_list):
    """(stage name, step inside it, its length) of a global step."""
    for name, n in stage_list:
        if step < n:
            return name, step, n
        step -= n
    return stage_list[-1][0], stage_list[-1][1], stage_list[-1][1]


# ----------------------------------------------------------------------------------------------------------
# Checkpoints


def rng_state():
    state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir, model, tok, optimizer, train_state):
    """
    Write out_dir/ckpt-<step>/ (the model as a Hugging Face directory, tokenizer, train_state.pt, run.json) under a
    temporary name, rename it into place, then point out_dir/latest at it (an atomic file replace), then
    delete older checkpoints. A kill at any point leaves `latest` naming a complete checkpoint.
    """
    name = f"ckpt-{train_state['step']:07d}"
    final, tmp = os.path.join(out_dir, name), os.path.join(out_dir, name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save(os.path.join(tmp, "tokenizer.tiktoken"))
    torch.save(dict(train_state, optimizer=optimizer.state_dict(), rng=rng_state()), os.path.join(tmp, "train_state.pt"))
    with open(os.path.join(tmp, "run.json"), "w") as f:
        json.dump(train_state["args"], f, indent=2)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    with open(os.path.join(out_dir, "latest.tmp"), "w") as f:
        f.write(name)
    os.replace(os.path.join(out_dir, "latest.tmp"), os.path.join(out_dir, "latest"))
    for old in os.listdir(out_dir):
        if old.startswith("ckpt-") and old != name:
            shutil.rmtree(os.path.join(out_dir, old), ignore_errors=True)
    return final


def load_checkpoint(out_dir):
    """(checkpoint directory, train state) of out_dir's latest checkpoint."""
    latest = os.path.join(out_dir, "latest")
    if not os.path.isfile(latest):
        raise SystemExit(f"error: --resume: no checkpoint in {out_dir!r} (no 'latest' file)")
    with open(latest) as f:
        path = os.path.join(out_dir, f.read().strip())
    state = torch.load(os.path.join(path, "train_state.pt"), weights_only=False)   # our own file, written above
    return path, state


# ----------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model, processor, world, split, n_per_task, device, autocast, batch_size=32, max_new_tokens=40):
    """Greedy answers to n_per_task samples of every task; returns {task: mean score} and one example per task."""
    from data.toyworld import TASKS
    from sample import generate
    model.eval()
    scores, examples = {}, {}
    for task in TASKS:
        samples = [world.sample(split, i, task=task) for i in range(n_per_task)]
        total = 0.0
        for i in range(0, len(samples), batch_size):
            chunk = samples[i:i + batch_size]
            batch = processor([s["messages"][:1] for s in chunk], add_generation_prompt=True)
            batch = {k: v.to(device) for k, v in batch.items() if v is not None and k != "labels"}
            with autocast:
                out = generate(model, **batch, max_new_tokens=max_new_tokens, temperature=0.0,
                               eos_ids=processor.tok.eos_ids, pad_id=processor.tok.pad_id)
            out = out[0] if isinstance(out, tuple) else out
            for s, ids in zip(chunk, out.tolist()):
                reply = processor.tok.decode(ids, skip_special_tokens=True).strip()
                total += TASKS[task].score(reply, s)
                examples.setdefault(task, (s, reply))
        scores[task] = total / len(samples)
    model.train()
    return scores, examples


# ----------------------------------------------------------------------------------------------------------
# Plots


def plot(out_dir, metrics, stage_list):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from data.toyworld import TASKS
    train = [m for m in metrics if "loss" in m]
    evals = [m for m in metrics if "eval" in m]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot([m["step"] for m in train], [m["loss"] for m in train], lw=1)
    edge = 0
    for name, n in stage_list:
        ax.axvline(edge, color="gray", ls=":", lw=0.8)
        ax.text(edge, ax.get_ylim()[1], f" {name}", va="top", fontsize=8)
        edge += n
    ax.set(xlabel="step", ylabel="train loss", yscale="log", title="training loss")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "loss.png"), dpi=120)
    plt.close(fig)
    if evals:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for i, task in enumerate(TASKS):
            c = f"C{i % 10}"
            ax.plot([m["step"] for m in evals], [m["eval"][task] for m in evals], marker="o", ms=3, color=c, label=task)
            ax.axhline(TASKS[task].chance, color=c, ls=":", lw=0.8)
        ax.set(xlabel="step", ylabel="validation score", ylim=(0, 1.02), title="per-task score (dotted: chance)")
        ax.legend(fontsize=7, ncol=2, loc="upper left")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "metrics.png"), dpi=120)
        plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# Main


def flops_per_token(cfg, seq_len):
    """Training FLOPs per LLM token: 6 x (non-embedding LLM parameters) + attention (12 x layers x width x seq)."""
    t = cfg.text
    attn = t.hidden_size * t.head_dim * (2 * t.num_attention_heads + 2 * t.num_key_value_heads)
    mlp = 3 * t.hidden_size * t.intermediate_size
    return 6 * t.num_hidden_layers * (attn + mlp) + 6 * t.hidden_size * t.vocab_size + \
        12 * t.num_hidden_layers * t.num_attention_heads * t.head_dim * seq_len


def main(argv=None):
    args = parse_args(argv)
    from data.toyworld import TASKS, ToyWorld
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "bfloat16": torch.bfloat16,
             "float32": torch.float32}[args.dtype]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    os.makedirs(args.out_dir, exist_ok=True)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    world = ToyWorld(seed=args.seed, image_size=args.image_size)

    # -- tokenizer, processor and model --
    resume_path, state = load_checkpoint(args.out_dir) if args.resume else (None, None)
    if resume_path:
        tok = Tokenizer.from_pretrained(os.path.join(resume_path, "tokenizer.tiktoken"))
        model = Qwen3VL.from_pretrained(resume_path)
    elif args.init_from:
        try:
            model = Qwen3VL.from_pretrained(args.init_from)
            tok = Tokenizer.from_pretrained(args.init_from)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"error: --init_from {args.init_from!r}: {e}") from e
        if tok.n_vocab > model.cfg.text.vocab_size or tok.image_token_id != model.cfg.image_token_id:
            raise SystemExit(f"error: --init_from {args.init_from!r}: its tokenizer ({tok.n_vocab} tokens, image "
                             f"token {tok.image_token_id}) does not fit the model (vocab {model.cfg.text.vocab_size}, "
                             f"image token {model.cfg.image_token_id})")
    else:
        t0 = time.time()
        tok = Tokenizer.train(world.text_corpus(4000), args.vocab_size)
        print(f"trained a {tok.n_vocab}-token BPE on the toy world in {time.time() - t0:.1f}s")
        cfg = Qwen3VLConfig.from_preset(
            args.preset, text=dict(vocab_size=64 * math.ceil(tok.n_vocab / 64)),
            image_token_id=tok.image_token_id, video_token_id=tok.video_token_id,
            vision_start_token_id=tok.vision_start_id, vision_end_token_id=tok.vision_end_id)
        model = Qwen3VL(cfg)
        model.init_weights()
    model.to(device)
    cfg = model.cfg
    processor = Processor(tok, min_pixels=args.image_size ** 2 // 2, max_pixels=args.image_size ** 2 * 4)
    print(f"model: {model.num_params():,} parameters ({sum(p.numel() for p in model.visual.parameters()):,} in the "
          f"ViT); device {device}, compute dtype {dtype}")
    optimizer = make_optimizer(model, args, device)
    packer = Packer(world, processor, model)
    step, metrics = 0, []
    if state:
        optimizer.load_state_dict(state["optimizer"])
        step, packer.index = state["step"], state["data_index"]
        set_rng_state(state["rng"])
        with open(os.path.join(args.out_dir, "metrics.jsonl")) as f:
            metrics = [m for m in map(json.loads, f) if m["step"] <= step]   # drop what was logged after the save
        print(f"resumed from {resume_path} at step {step}")
    with open(os.path.join(args.out_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(m) + "\n" for m in metrics)
    train_model = torch.compile(model) if args.compile else model

    total_steps = sum(n for _, n in args.stage_list)
    run_args = {k: v for k, v in vars(args).items() if k != "stage_list"}
    fpt = flops_per_token(cfg, args.seq_len)
    log = open(os.path.join(args.out_dir, "metrics.jsonl"), "a")
    t_start, tokens_seen = time.time(), 0

    # -- the loop --
    model.train()
    while True:
        last_step = step == total_steps
        if step > 0 and (step % args.eval_every == 0 or last_step):
            scores, _ = evaluate(model, processor, world, "val", args.eval_samples, device, autocast)
            metrics.append(dict(step=step, eval=scores))
            log.write(json.dumps(metrics[-1]) + "\n")
            log.flush()
            print("eval  " + "  ".join(f"{k} {v:.2f}" for k, v in scores.items()))
            save_checkpoint(args.out_dir, model, tok, optimizer,
                            dict(step=step, data_index=packer.index, args=run_args))
            plot(args.out_dir, metrics, args.stage_list)
        if last_step:
            break

        stage, k, n = stage_of(step, args.stage_list)
        set_trainable(model, STAGES[stage]["trainable"])
        lr = lr_at(k, n, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.time()
        loss_sum, n_tokens = 0.0, 0
        for _ in range(args.grad_accum):
            batch = packer.next_batch(stage, args.batch_size, args.seq_len * STAGES[stage]["seq_mult"])
            batch = {k: v.to(device) for k, v in batch.items() if v is not None}
            with autocast:
                _, loss = train_model(**batch)
            (loss / args.grad_accum).backward()
            loss_sum += loss.item() / args.grad_accum
            n_tokens += batch["input_ids"].numel()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        dt = time.time() - t0
        tokens_seen += n_tokens
        metrics.append(dict(step=step, stage=stage, loss=loss_sum, lr=lr))
        log.write(json.dumps(metrics[-1]) + "\n")
        if step % args.log_every == 0 or step == 1:
            tps = n_tokens / dt
            mfu = f" | MFU {100 * fpt * tps / 989e12:.1f}%" if device.type == "cuda" else ""
            eta = (time.time() - t_start) / max(1, tokens_seen) * n_tokens * (total_steps - step)
            print(f"step {step:5d}/{total_steps} | {stage:8s} | loss {loss_sum:.4f} | lr {lr:.2e} | "
                  f"{1000 * dt:.0f} ms | {tps:,.0f} tok/s{mfu} | ETA {eta / 60:.1f} min", flush=True)
    log.close()

    # -- final test evaluation, one sample, plots --
    scores, examples = evaluate(model, processor, world, "test", args.test_samples, device, autocast)
    print(f"\ntest ({args.test_samples} samples per task)    score   chance")
    for task, v in scores.items():
        print(f"  {task:10s}                   {v:6.2f}   {TASKS[task].chance:6.2f}")
    with open(os.path.join(args.out_dir, "test_scores.json"), "w") as f:
        json.dump({t: dict(score=v, chance=TASKS[t].chance) for t, v in scores.items()}, f, indent=2)
    s, reply = examples["bbox"]
    print(f"\nsample: {s['question']!r}\n  model: {reply}\n  truth: {s['answer']}")
    from processor import draw_grounding, parse_grounding
    image = s["messages"][0]["content"][0]["image"]
    draw_grounding(image.resize((256, 256)), parse_grounding(reply), os.path.join(args.out_dir, "sample.png"))
    print(f"wrote {args.out_dir}/loss.png, metrics.png, sample.png, metrics.jsonl; {packer.skipped} samples skipped "
          f"as longer than a row; {(time.time() - t_start) / 60:.1f} min")
    return scores


if __name__ == "__main__":
    main()
