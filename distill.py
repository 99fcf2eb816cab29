"""
Strong-to-weak distillation (Qwen3 report §4.5; Qwen3-VL report §4.3: text-only data, the LLM backbone only): the
losses, and the loop that trains a student against a teacher.

    python distill.py --teacher out/toy --student toy-cpu --phase off --lr 1e-3 --out_dir out/distill-off
    python distill.py --teacher out/toy --student out/distill-off --phase on --lambda_off 0.25 --lr 3e-4 \\
        --out_dir out/distill-on
    python distill.py --teacher path/to/Qwen3-VL-8B-Instruct --student path/to/Qwen3-VL-2B-Instruct \\
        --data text.jsonl --teacher_cache out/8b-top64.safetensors --out_dir out/2b-off   # teacher run once, freed

The losses: the student's next-token distribution q is pulled towards the teacher's p, token by token, over the
response tokens.

- forward_kl = KL(p || q): off-policy distillation along fixed sequences (the teacher's responses or a dataset).
  The student must cover everything the teacher puts mass on (mode covering). Its gradient with respect to the
  student logits is q - p, the soft-label cross-entropy's. Teacher outputs can be stored compactly as each token's
  top-k ids and log-probs (teacher_topk); the loss then compares the teacher's k largest probabilities plus one tail
  bucket holding the rest of its mass with the student's probabilities of the same k ids plus its own tail
  (forward_kl_topk). The (k + 1)-way KL is a lower bound of the full one (merging outcomes cannot increase a KL)
  and equals it at k = V.
- reverse_kl = KL(q || p): on-policy distillation, where the student samples the responses and the teacher scores
  them (GKD with beta = 1, lambda = 1). The student is penalised for putting mass where the teacher does not (mode
  seeking).
- jsd: GKD's generalised Jensen-Shannon divergence, beta KL(p || m) + (1 - beta) KL(q || m) with m = beta p +
  (1 - beta) q. It tends to beta KL(p || q) as beta -> 0 and to (1 - beta) KL(q || p) as beta -> 1; beta = 0 and
  beta = 1 give the exact forward and reverse KL (as TRL's generalized_jsd_loss).

Temperature T (every loss): both distributions are taken at the same temperature, p = softmax(z_teacher / T) and
q = softmax(z_student / T), and the loss is the divergence between them, NOT multiplied by T^2 (Hinton's factor,
which keeps gradient sizes equal across T; TRL and verl do not use it and the Qwen reports name no temperature).
So at each token d forward_kl / d z_student = (q - p) / T, and T = 1, the default, is the plain KL of the model's
own distributions, the one the student samples from on-policy.

Every loss is a mean over the tokens where mask [B, T] is 1 (prompt, padding and tool tokens have mask 0 and are
not computed at all). Teacher inputs are detached: the teacher is a fixed target. Logits at position t predict
token t + 1 for both models, so student and teacher logits must be aligned the same way as the mask.

The loop. A training sample is a prompt and a reply: the data's (its last assistant message and <|im_end|>, as the
chat template writes them) or, with --teacher_answers, the teacher's greedy answer to the prompt. Step s uses the
data's samples number s * batch_size ... (s + 1) * batch_size - 1 (a pure function of the step, so a resumed run
sees the same batches), each row a prompt + reply, left-padded; the losses compare the two models at the positions
that predict reply tokens, and the head runs on those positions only.
- --phase off: the student minimises forward_kl_topk against the teacher's top-k log-probs along the replies
  ("scores given responses"). They are computed with the teacher in memory step by step, or once for the whole
  run into --teacher_cache (a safetensors file: for each data row number, its prompt and reply tokens and the
  teacher's top-k ids and log-probs at every reply token), after which the teacher is freed; a run given an
  existing cache checks it against the data and never loads the teacher's weights.
- --phase on: the student samples a reply to each prompt (sample.generate at --temperature), the teacher scores it
  in one forward pass, and the student minimises reverse_kl over the full vocabulary at each sampled position
  (GKD with beta = 1). With --lambda_off, each step is an off-policy batch (as above, the teacher online) with
  that probability, drawn from the step number (GKD's lambda is the on-policy share: 1 - lambda_off).
- By default only the LLM learns; the vision tower and its mergers are frozen (--unfreeze_vision trains them on
  samples with images or videos). The teacher and the student may differ in every size but must share the
  tokenizer: the same BPE ranks, special-token ids and number of logits (checked before anything runs).
- The held-out KL, every --eval_every steps, at the start and at the end: the forward KL over the teacher's top-k +
  tail along the replies of --eval_samples held-out samples (the data's replies, whatever the phase).
- Like train.py: a progress line per step, metrics.jsonl, loss.png (training loss and held-out KL), checkpoints
  (model, optimizer, step, RNG) that --resume continues exactly, and a Hugging Face export in out_dir/hf/. One
  process: generating rollouts under FSDP would need every rank to decode in step, which is not written.
"""
import argparse
import hashlib
import json
import math
import os
import random
import time

import torch
import torch.nn.functional as F

import train
from checks import check_number
from data import BadSample, open_data
from config import PRESETS, Qwen3VLConfig, parse_arch, read_hf_config
from sample import generate, load_model, load_processor


def check_temperature(temperature):
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def log_probs(logits, mask, temperature):
    """logits [B, T, V], mask [B, T] -> log softmax(logits / T) at the N masked tokens [N, V], in float32 at least."""
    check_temperature(temperature)
    logits = logits[mask.bool()]
    return F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=-1)


def token_mean(per_token):
    """[N] -> the mean over the N masked tokens (0 when there are none)."""
    return per_token.sum() / max(per_token.shape[0], 1)


def kl(log_a, log_b):
    """KL(a || b) per token [N] from log-probabilities [N, V] (or [N, k + 1] buckets)."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def forward_kl(student_logits, teacher_logits, mask, temperature=1.0, top_k=None):
    """
    KL(teacher || student), the mean over masked tokens. student_logits, teacher_logits [B, T, V]; mask [B, T].
    top_k: compare only the teacher's k largest probabilities and a tail bucket (through forward_kl_topk, as if
    the teacher outputs had been stored with teacher_topk).
    """
    if top_k is not None:
        ids, logprobs = teacher_topk(teacher_logits, top_k, temperature)
        return forward_kl_topk(student_logits, ids, logprobs, mask, temperature)
    log_q = log_probs(student_logits, mask, temperature)                             # [N, V]
    log_p = log_probs(teacher_logits.detach(), mask, temperature)                    # [N, V]
    return token_mean(kl(log_p, log_q))


@torch.no_grad()
def teacher_topk(teacher_logits, k, temperature=1.0):
    """
    Teacher logits [B, T, V] -> the stored form: ids [B, T, k] long and log-probs [B, T, k] (float32 at least) of
    its k most likely tokens at temperature T, largest first.
    """
    V = teacher_logits.shape[-1]
    if not 1 <= k <= V:
        raise ValueError(f"top_k must be in [1, vocabulary size {V}], got {k}")
    check_temperature(temperature)
    logits = teacher_logits.to(torch.promote_types(teacher_logits.dtype, torch.float32))
    logprobs, ids = F.log_softmax(logits / temperature, dim=-1).topk(k, dim=-1)
    return ids, logprobs


def forward_kl_topk(student_logits, teacher_ids, teacher_logprobs, mask, temperature=1.0):
    """
    KL(teacher || student) over k + 1 buckets: the teacher's top-k tokens and one tail for the rest. student_logits
    [B, T, V]; teacher_ids [B, T, k] long and teacher_logprobs [B, T, k] (from teacher_topk at the same
    temperature); mask [B, T]. Per token, with P_tail = 1 - sum_k p and Q_tail the student's mass off the k ids:
        sum_k p_k (log p_k - log q_k) + P_tail (log P_tail - log Q_tail)
    Its gradient with respect to the student logits is q - p~, where p~ is p on the k ids and spreads P_tail over
    the other tokens in proportion to q. At k = V the tail is empty and this is forward_kl.
    """
    tokens = mask.bool()
    log_q = log_probs(student_logits, mask, temperature)                             # [N, V]
    ids = teacher_ids[tokens]                                                        # [N, k]
    log_p = teacher_logprobs[tokens].detach().to(log_q.dtype)                        # [N, k]
    per_token = kl(log_p, log_q.gather(-1, ids))                                     # [N]
    if ids.shape[-1] < log_q.shape[-1]:
        p_tail = (1 - log_p.exp().sum(-1)).clamp_min(0)                              # [N]
        log_q_tail = log_q.scatter(-1, ids, -math.inf).logsumexp(-1)                 # [N]
        per_token = per_token + torch.special.xlogy(p_tail, p_tail) - p_tail * log_q_tail
    return token_mean(per_token)


def reverse_kl(student_logits, teacher_logits, mask, temperature=1.0):
    """KL(student || teacher), the mean over masked tokens. student_logits, teacher_logits [B, T, V]; mask [B, T]."""
    log_q = log_probs(student_logits, mask, temperature)                             # [N, V]
    log_p = log_probs(teacher_logits.detach(), mask, temperature)                    # [N, V]
    return token_mean(kl(log_q, log_p))


def jsd(student_logits, teacher_logits, mask, beta=0.5, temperature=1.0):
    """
    Generalised JSD(beta) = beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q, p the teacher and
    q the student; the mean over masked tokens. beta = 0: forward_kl (KL(p || q)); beta = 1: reverse_kl
    (KL(q || p)). At beta = 0.5 it lies in [0, log 2].
    """
    if not 0 <= beta <= 1:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0:
        return forward_kl(student_logits, teacher_logits, mask, temperature)
    if beta == 1:
        return reverse_kl(student_logits, teacher_logits, mask, temperature)
    log_q = log_probs(student_logits, mask, temperature)                             # [N, V]
    log_p = log_probs(teacher_logits.detach(), mask, temperature)                    # [N, V]
    log_m = torch.logaddexp(math.log(beta) + log_p, math.log(1 - beta) + log_q)      # [N, V]
    return token_mean(beta * kl(log_p, log_m) + (1 - beta) * kl(log_q, log_m))


# ----------------------------------------------------------------------------------------------------------
# Settings

TEXT_STAGE = "text"     # the toy world's text-only questions (data/toy.py), drawn where the data defines the stage


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=train.Formatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    # models
    p.add_argument("--teacher", required=True, help="a Hugging Face Qwen3-VL directory, a train.py checkpoint or a "
                   "train.py output directory (its latest checkpoint)")
    p.add_argument("--student", required=True, help="the same kinds of directory, or a preset built from scratch "
                   "with the teacher's tokenizer and number of logits and the preset's sizes: " + ", ".join(PRESETS))
    p.add_argument("--student_arch", default="", help="a preset student's config fields over the preset's, as "
                   "train.py's --arch (config.parse_arch), e.g. text.num_hidden_layers=2")
    p.add_argument("--phase", default="off", choices=["off", "on"], help="off: forward KL to the teacher's top-k "
                   "along given replies; on: reverse KL along the student's own samples")
    # data
    p.add_argument("--data", default="toy", help="'toy' (the toy world's text-only questions) or JSONL files with "
                   "weights: a.jsonl:3,b.jsonl:1")
    p.add_argument("--eval_data", default="", help="where the held-out samples come from (default: the toy world's "
                   "validation split with --data toy, else none)")
    p.add_argument("--eval_samples", type=int, default=32, help="held-out samples whose KL is measured (0: none)")
    p.add_argument("--teacher_answers", action="store_true", help="off-policy batches learn along the teacher's "
                   "greedy answers to the prompts instead of the data's replies")
    p.add_argument("--teacher_cache", default="", help="--phase off: a safetensors file of the teacher's top-k along "
                   "every reply of the run; written if missing (then the teacher is freed), else read and checked")
    # losses
    p.add_argument("--top_k", type=int, default=64, help="teacher log-probs kept per token in off-policy batches "
                   "(plus one tail bucket; as many as the logits: the full forward KL)")
    p.add_argument("--temperature", type=float, default=1.0, help="of both distributions in every loss, the "
                   "teacher's top-k and the student's on-policy sampling (1: the models' own distributions)")
    p.add_argument("--lambda_off", type=float, default=0.0, help="--phase on: the probability that a step is an "
                   "off-policy batch instead")
    p.add_argument("--max_new_tokens", type=int, default=256, help="longest reply the student (on-policy) or the "
                   "teacher (--teacher_answers) writes")
    # optimisation
    p.add_argument("--steps", type=int, default=100, help="0: only the held-out KL and the Hugging Face export "
                   "(a preset student's initial weights, or another model's KL)")
    p.add_argument("--batch_size", type=int, default=8, help="samples per step")
    p.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (warmup, then a cosine)")
    p.add_argument("--min_lr_ratio", type=float, default=0.1, help="cosine floor as a fraction of the peak")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--beta2", type=float, default=0.95)
    p.add_argument("--grad_clip", type=float, default=1.0, help="global gradient norm limit (0: off)")
    p.add_argument("--unfreeze_vision", action="store_true", help="train the vision tower and mergers too (on "
                   "samples with images or videos; by default only the LLM learns)")
    p.add_argument("--vision_lr_mult", type=float, default=1.0, help="with --unfreeze_vision: the ViT's learning "
                   "rate as a fraction of --lr")
    # evaluation, checkpoints
    p.add_argument("--eval_every", type=int, default=50, help="steps between held-out KLs and checkpoints (0: at "
                   "the end only)")
    p.add_argument("--out_dir", default="out/distill")
    p.add_argument("--resume", action="store_true", help="continue from out_dir's latest good checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start anew in an out_dir that holds a run")
    p.add_argument("--keep_checkpoints", type=int, default=2)
    p.add_argument("--export_dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    # system
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (auto: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="compute dtype (auto: bf16 on cuda)")
    p.add_argument("--seed", type=int, default=0)
    # train.build_model's settings, at the reference's values: a preset student starts as train.py's would
    p.set_defaults(pos_embed_std=0.02, activation_checkpointing=False, init_from="", cp=1)
    return p


def parse_args(argv=None):
    """The flags, each checked (ValueError / TypeError naming it); those that need the models are checked in main."""
    args = get_parser().parse_args(argv)
    for name, low in (("steps", 0), ("batch_size", 1), ("eval_samples", 0), ("eval_every", 0), ("top_k", 1),
                      ("max_new_tokens", 1), ("warmup", 0), ("keep_checkpoints", 1), ("seed", 0)):
        check_number(f"--{name}", getattr(args, name), low, integer=True)
    check_number("--temperature", args.temperature, 0, low_open=True)
    check_number("--lr", args.lr, 0, low_open=True)
    check_number("--beta2", args.beta2, 0, 1, low_open=True)
    check_number("--lambda_off", args.lambda_off, 0, 1)
    for name in ("min_lr_ratio", "weight_decay", "grad_clip", "vision_lr_mult"):
        check_number(f"--{name}", getattr(args, name), 0)
    if args.phase == "off" and args.lambda_off:
        raise ValueError("--lambda_off mixes off-policy batches into --phase on; --phase off has only those")
    if args.phase == "on" and args.teacher_answers and not args.lambda_off:
        raise ValueError("--teacher_answers changes the off-policy batches: with --phase on it needs --lambda_off > 0")
    if args.student_arch and args.student not in PRESETS:
        raise ValueError(f"--student_arch {args.student_arch}: builds a new student from a preset; --student "
                         f"{args.student!r} is not one ({', '.join(PRESETS)})")
    if args.teacher_cache and args.phase == "on":
        raise ValueError("--teacher_cache holds the off-policy phase's teacher outputs; --phase on scores the "
                         "student's samples with the teacher in memory")
    if args.teacher_cache and not os.path.isdir(os.path.dirname(os.path.abspath(args.teacher_cache))):
        raise FileNotFoundError(f"--teacher_cache {args.teacher_cache!r}: no such directory")
    return args


# ----------------------------------------------------------------------------------------------------------
# The models: a teacher and a student that share the tokenizer


def read_teacher(path):
    """The teacher's checkpoint folder, tokenizer, config and processor (no weights: they are loaded when needed)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--teacher {path!r}: no such directory (a Hugging Face Qwen3-VL directory or a "
                                "train.py checkpoint)")
    path, tok, processor = load_processor(path)
    return path, tok, read_hf_config(path), processor


def student_setup(args, teacher, resume):
    """The student's tokenizer, config, processor and weights folder (None: built from scratch or resumed later): a
    resumed run's checkpoint, a directory, or a preset with the teacher's tokenizer, number of logits and processor.
    teacher: read_teacher's (path, tokenizer, config, processor)."""
    if resume:
        _, tok, processor = load_processor(resume)
        return tok, read_hf_config(resume), processor, None
    if args.student in PRESETS:
        _, teacher_tok, teacher_cfg, teacher_processor = teacher
        arch = parse_arch(args.student_arch)
        text = {**arch.pop("text", {}), "vocab_size": teacher_cfg.text.vocab_size}
        cfg = Qwen3VLConfig.from_preset(args.student, text=text, **arch,
                                        image_token_id=teacher_tok.image_token_id,
                                        video_token_id=teacher_tok.video_token_id,
                                        vision_start_token_id=teacher_tok.vision_start_id,
                                        vision_end_token_id=teacher_tok.vision_end_id)
        return teacher_tok, cfg, teacher_processor, None
    if not os.path.isdir(args.student):
        raise FileNotFoundError(f"--student {args.student!r}: neither a directory nor a preset ({', '.join(PRESETS)})")
    path, tok, processor = load_processor(args.student)
    return tok, read_hf_config(path), processor, path


def vocabulary(tok, cfg):
    """What two models must share to be compared id by id: the BPE ranks, the special tokens and their ids, the
    number of logits, and the ids the config gives the visual tokens."""
    return dict(ranks=tok.ranks, special=tok.special, logits=cfg.text.vocab_size,
                visual=(cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id))


def fingerprint(tok):
    """A digest of a tokenizer's ranks and special tokens (recorded in a teacher cache)."""
    h = hashlib.sha256()
    for token, rank in sorted(tok.ranks.items(), key=lambda kv: kv[1]):
        h.update(len(token).to_bytes(4, "little") + token)
    h.update(json.dumps(sorted(tok.special.items())).encode())
    return h.hexdigest()


def check_shared_vocabulary(teacher, student):
    """teacher, student: (name, tokenizer, config). ValueError naming both unless they share the vocabulary."""
    (t_name, t_tok, t_cfg), (s_name, s_tok, s_cfg) = teacher, student
    t, s = vocabulary(t_tok, t_cfg), vocabulary(s_tok, s_cfg)
    if t["ranks"] != s["ranks"]:
        problem = "their BPE vocabularies differ"
    elif t["special"] != s["special"]:
        names = sorted(n for n in set(t["special"]) | set(s["special"]) if t["special"].get(n) != s["special"].get(n))
        problem = "their special-token ids differ: " + ", ".join(
            f"{n} {t['special'].get(n)} vs {s['special'].get(n)}" for n in names[:4])
    elif t["logits"] != s["logits"]:
        problem = f"their models have {t['logits']} and {s['logits']} logits"
    elif t["visual"] != s["visual"]:
        problem = f"their configs give the visual tokens the ids {t['visual']} and {s['visual']}"
    else:
        return

    def describe(tok, cfg):
        return f"{tok.n_vocab} tokens, {cfg.text.vocab_size} logits, <|im_end|> = {tok.im_end_id}"
    raise ValueError(f"the teacher {t_name!r} ({describe(t_tok, t_cfg)}) and the student {s_name!r} "
                     f"({describe(s_tok, s_cfg)}) do not share a tokenizer: {problem}; distillation compares their "
                     "next-token distributions id by id")


def freeze_vision(model, unfreeze):
    """Only the LLM learns (the paper's text-only distillation), unless unfreeze: the vision tower and mergers too."""
    for name, p in model.named_parameters():
        p.requires_grad = unfreeze or not name.startswith("visual.")


# ----------------------------------------------------------------------------------------------------------
# Rows: prompt + reply, left-padded


def encode_prompts(processor, samples):
    """The samples' prompts followed by the assistant's header: left-padded input_ids [B, P], attention_mask [B, P],
    pixels and grids (the Processor's keyword arguments, without labels)."""
    batch = processor([s["prompt"] for s in samples], add_generation_prompt=True)
    batch.pop("labels")
    return batch


def prompt_ids(prompts, b):
    """Row b's prompt tokens [P_b] (without its padding)."""
    return prompts["input_ids"][b][prompts["attention_mask"][b].bool()]


def data_replies(processor, samples, prompts):
    """Each sample's own reply [L_b]: the tokens the chat template writes for its last assistant message (the
    message and <|im_end|>), after the prompt."""
    replies = []
    for b, s in enumerate(samples):
        full = processor([s["messages"]])
        ids, labels, prompt = full["input_ids"][0], full["labels"][0], prompt_ids(prompts, b)
        n = len(prompt)
        if not torch.equal(ids[:n], prompt) or not (labels[n:] != -100).any():
            raise BadSample(f"{s['origin']}: no assistant reply after its prompt")
        replies.append(ids[n:][labels[n:] != -100])
    return replies


def stop_ids(tok):
    """What ends a sampled reply: an EOS, or a visual placeholder (a model that has not learned never to write one
    can sample it, and a row with placeholders but no pixels is not a valid input; as the last token of a reply it
    is only a target, never an input)."""
    return tok.eos_ids + [tok.image_token_id, tok.video_token_id]


def sampled_replies(model, prompts, tok, args, run, temperature, generator=None):
    """Each prompt's reply [L_b] sampled by `model` (temperature 0: greedy): up to and including its first stop
    token (stop_ids), or max_new_tokens long without one."""
    with run.autocast:
        tokens = generate(model, **on_device(prompts, run.device), max_new_tokens=args.max_new_tokens,
                          temperature=temperature, eos_ids=stop_ids(tok), pad_id=tok.pad_id, generator=generator)
    stops = torch.tensor(stop_ids(tok))
    replies = []
    for row in tokens.cpu():                                                       # [L]
        ends = torch.isin(row, stops).nonzero()
        replies.append(row[:int(ends[0]) + 1] if len(ends) else row)
    return replies


def join(prompts, replies, pad_id):
    """
    The model's input for prompt + reply per row: the prompt and every reply token but the last (which is only a
    target), left-padded to one length S, with the prompts' pixels and grids; and mask [B, S], 1 at the positions
    that predict a reply token (position t predicts token t + 1: the last L_b positions of row b).
    """
    rows = [torch.cat([prompt_ids(prompts, b), r[:-1]]) for b, r in enumerate(replies)]
    B, S = len(rows), max(len(r) for r in rows)
    input_ids = torch.full((B, S), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, S, dtype=torch.long)
    mask = torch.zeros(B, S, dtype=torch.bool)
    for b, (row, reply) in enumerate(zip(rows, replies)):
        input_ids[b, S - len(row):] = row
        attention_mask[b, S - len(row):] = 1
        mask[b, S - len(reply):] = True
    return dict(prompts, input_ids=input_ids, attention_mask=attention_mask), mask


def on_device(batch, device):
    return {k: v.to(device) for k, v in batch.items() if v is not None}


def next_token_logits(model, inputs, mask, autocast):
    """The logits [N, V] at the N positions where mask [B, S] is 1: the head runs on those hidden states only."""
    with autocast:
        hidden, _ = model(**inputs, return_hidden=True)                                  # [B, S, H]
        return model.lm_head(hidden[mask])                                               # [N, V]


# ----------------------------------------------------------------------------------------------------------
# The teacher's top-k along replies, in memory or in a cache file


class TeacherOutputs:
    """
    The teacher's top-k next-token log-probs along the replies of some data rows (the numbers of samples in a
    dataset): rows[r] = (prompt [P] long, reply [L] long, ids [L, k] long, logprobs [L, k] float32), where
    ids[j], logprobs[j] are the teacher's k most likely tokens at the position that predicts reply[j]. `source` names
    where they come from in error messages.
    """

    def __init__(self, source):
        self.source, self.rows = source, {}

    def span(self):
        rows = sorted(self.rows)
        return f"{len(rows)} samples, numbers {rows[0]}-{rows[-1]}" if rows else "no samples"

    def tensors(self, prefix):
        """The safetensors layout: rows [n], prompt_lengths [n], reply_lengths [n], tokens [sum P + L] (each row's
        prompt then reply), ids [sum L, k] int32, logprobs [sum L, k] float32, the rows in increasing order."""
        rows = sorted(self.rows)
        entries = [self.rows[r] for r in rows]
        return {f"{prefix}.rows": torch.tensor(rows, dtype=torch.long),
                f"{prefix}.prompt_lengths": torch.tensor([len(e[0]) for e in entries], dtype=torch.long),
                f"{prefix}.reply_lengths": torch.tensor([len(e[1]) for e in entries], dtype=torch.long),
                f"{prefix}.tokens": torch.cat([torch.cat(e[:2]) for e in entries]),
                f"{prefix}.ids": torch.cat([e[2] for e in entries]).int(),
                f"{prefix}.logprobs": torch.cat([e[3] for e in entries]).float()}

    @classmethod
    def from_tensors(cls, tensors, prefix, source):
        out = cls(source)
        rows, prompt_lengths, reply_lengths = (tensors[f"{prefix}.{k}"].tolist()
                                               for k in ("rows", "prompt_lengths", "reply_lengths"))
        tokens = tensors[f"{prefix}.tokens"].split([p + r for p, r in zip(prompt_lengths, reply_lengths)])
        ids = tensors[f"{prefix}.ids"].long().split(reply_lengths)
        logprobs = tensors[f"{prefix}.logprobs"].split(reply_lengths)
        for r, t, p, i, lp in zip(rows, tokens, prompt_lengths, ids, logprobs):
            out.rows[r] = (t[:p], t[p:], i, lp)
        return out


@torch.no_grad()
def score_replies(teacher, processor, data, rows, stage, args, run, answer, source):
    """
    TeacherOutputs of data rows `rows` (a list of sample numbers), in batches of --batch_size: each sample's prompt
    and reply (answer=True: the teacher's greedy answer, else the data's reply) and the teacher's top-k log-probs
    at --temperature at every reply token, from one forward pass over prompt + reply.
    """
    tok, out = processor.tok, TeacherOutputs(source)
    for i in range(0, len(rows), args.batch_size):
        chunk = rows[i:i + args.batch_size]
        samples = [data.sample(r, stage) for r in chunk]
        prompts = encode_prompts(processor, samples)
        replies = sampled_replies(teacher, prompts, tok, args, run, temperature=0.0) if answer else \
            data_replies(processor, samples, prompts)
        inputs, mask = join(prompts, replies, tok.pad_id)
        logits = next_token_logits(teacher, on_device(inputs, run.device), mask.to(run.device), run.autocast)
        ids, logprobs = teacher_topk(logits, args.top_k, args.temperature)             # [N, k] each
        lengths = [len(r) for r in replies]
        for b, (r, reply, i_b, lp_b) in enumerate(zip(chunk, replies, ids.cpu().split(lengths),
                                                       logprobs.cpu().split(lengths))):
            out.rows[r] = (prompt_ids(prompts, b), reply, i_b, lp_b)
    return out


def teacher_batch(outputs, processor, data, rows, stage, answered):
    """
    The samples `rows` with the teacher's top-k along their replies, from `outputs`: model inputs, mask [B, S] and
    the teacher's ids, logprobs [N, k] at the N masked positions. The stored tokens must be the data's: the prompt,
    and the reply unless the teacher wrote it (answered); ValueError naming the sample otherwise.
    """
    samples = [data.sample(r, stage) for r in rows]
    prompts = encode_prompts(processor, samples)
    replies = None if answered else data_replies(processor, samples, prompts)
    stored = []
    for b, (r, s) in enumerate(zip(rows, samples)):
        if r not in outputs.rows:
            raise ValueError(f"{outputs.source}: no teacher outputs for sample {r} ({s['origin']}); it holds "
                             f"{outputs.span()}")
        prompt, reply, ids, logprobs = outputs.rows[r]
        part = "prompt" if not torch.equal(prompt, prompt_ids(prompts, b)) else \
            "reply" if replies is not None and not torch.equal(reply, replies[b]) else None
        if part:
            raise ValueError(f"{outputs.source}: sample {r} ({s['origin']}) does not match the data: its {part} "
                             "differs (made from other data, another --seed or another tokenizer)")
        stored.append((reply, ids, logprobs))
    inputs, mask = join(prompts, [reply for reply, _, _ in stored], processor.tok.pad_id)
    return inputs, mask, torch.cat([ids for _, ids, _ in stored]), torch.cat([lp for _, _, lp in stored])


def cache_settings(args, teacher_path, teacher_tok):
    """What a teacher cache is made of: it serves only a run with the same teacher, tokenizer and settings."""
    return dict(teacher=os.path.realpath(teacher_path), tokenizer=fingerprint(teacher_tok), top_k=args.top_k,
                temperature=args.temperature, teacher_answers=args.teacher_answers,
                max_new_tokens=args.max_new_tokens if args.teacher_answers else None)


def save_cache(path, parts, settings):
    """parts {name: TeacherOutputs} and the settings that made them -> one safetensors file (written, then renamed);
    a part without rows is left out."""
    from safetensors.torch import save_file
    parts = {name: outputs for name, outputs in parts.items() if outputs is not None and outputs.rows}
    tensors = {k: v for name, outputs in parts.items() for k, v in outputs.tensors(name).items()}
    save_file(tensors, path + ".tmp", metadata=dict(settings=json.dumps(settings), parts=json.dumps(list(parts))))
    os.replace(path + ".tmp", path)


def load_cache(path, settings):
    """{"train": TeacherOutputs, "eval": TeacherOutputs} of a cache file made with `settings` (a part it lacks has no
    rows); ValueError naming the first setting that differs."""
    from safetensors import safe_open
    source = f"--teacher_cache {path}"
    try:
        with safe_open(path, "pt") as f:
            meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
        made, parts = json.loads(meta["settings"]), json.loads(meta["parts"])
        outputs = {name: TeacherOutputs.from_tensors(tensors, name, source) if name in parts
                   else TeacherOutputs(source) for name in ("train", "eval")}
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        raise ValueError(f"{source}: not a teacher cache of distill.py ({type(e).__name__}: {e})") from None
    for key, value in settings.items():
        if made.get(key) != value:
            raise ValueError(f"{source}: made with {key} = {made.get(key)!r}, this run has {value!r}")
    return outputs


# ----------------------------------------------------------------------------------------------------------
# The loop


def step_draws(args, step):
    """Whether step `step` is an on-policy batch, and the seed of its sampling: a function of (seed, step) alone."""
    rng = random.Random(f"distill/{args.seed}/{step}")
    return args.phase == "on" and rng.random() >= args.lambda_off, rng.getrandbits(63)


def off_policy_loss(student, outputs, processor, data, rows, stage, args, run, answered):
    """Forward KL over the teacher's top-k + tail along the rows' replies, from TeacherOutputs (answered: the
    replies are the teacher's): the loss and its number of reply tokens."""
    inputs, mask, ids, logprobs = teacher_batch(outputs, processor, data, rows, stage, answered)
    logits = next_token_logits(student, on_device(inputs, run.device), mask.to(run.device), run.autocast)  # [N, V]
    ones = torch.ones(1, len(logits), device=run.device)
    return forward_kl_topk(logits[None], ids[None].to(run.device), logprobs[None].to(run.device), ones,
                           args.temperature), len(logits)


def on_policy_loss(student, teacher, processor, data, rows, stage, args, run, seed):
    """Reverse KL over the full vocabulary at every token of replies the student samples to the rows' prompts (at
    --temperature, from a generator seeded with `seed`): the loss and its number of reply tokens."""
    prompts = encode_prompts(processor, [data.sample(r, stage) for r in rows])
    replies = sampled_replies(student, prompts, processor.tok, args, run, args.temperature,
                              torch.Generator(run.device).manual_seed(seed))
    inputs, mask = join(prompts, replies, processor.tok.pad_id)
    inputs, mask = on_device(inputs, run.device), mask.to(run.device)
    with torch.no_grad():
        teacher_logits = next_token_logits(teacher, inputs, mask, run.autocast)            # [N, V]
    logits = next_token_logits(student, inputs, mask, run.autocast)                        # [N, V]
    ones = torch.ones(1, len(logits), device=run.device)
    return reverse_kl(logits[None], teacher_logits[None], ones, args.temperature), len(logits)


@torch.no_grad()
def held_out_kls(student, teacher, outputs, processor, eval_data, stage, args, run):
    """
    The KLs per reply token over the held-out samples: eval_kl, the forward KL (teacher's top-k + tail) along their
    replies (what the off-policy phase lowers), and with the teacher in memory eval_rkl, the reverse KL along
    replies the student samples to their prompts (what the on-policy phase lowers; the same seeds every time).
    """
    rows = list(range(args.eval_samples))
    sums = {}                                                  # name -> (sum of loss x tokens, tokens)
    for i in range(0, len(rows), args.batch_size):
        chunk = rows[i:i + args.batch_size]
        parts = dict(eval_kl=off_policy_loss(student, outputs, processor, eval_data, chunk, stage, args, run, False))
        if teacher is not None:
            seed = random.Random(f"distill/{args.seed}/held-out/{i}").getrandbits(63)
            parts["eval_rkl"] = on_policy_loss(student, teacher, processor, eval_data, chunk, stage, args, run, seed)
        for name, (loss, n) in parts.items():
            total, count = sums.get(name, (0.0, 0))
            sums[name] = (total + loss.item() * n, count + n)
    return {name: total / count for name, (total, count) in sums.items()}


def plot(out_dir, metrics):
    """loss.png: the training loss per step (off-policy and on-policy batches) and the held-out KLs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for kind, label in (("off", "off-policy: forward KL, top-k + tail"), ("on", "on-policy: reverse KL")):
        steps = [m for m in metrics if m.get("batch") == kind]
        if steps:
            left.plot([m["step"] for m in steps], [m["loss"] for m in steps], ".", ms=4, label=label)
    left.set(xlabel="step", ylabel="nats per reply token", title="training loss")
    left.legend(fontsize=8)
    for name, label in (("eval_kl", "KL(teacher || student), top-k + tail, along the replies"),
                        ("eval_rkl", "KL(student || teacher) along the student's samples")):
        evals = [m for m in metrics if name in m]
        if evals:
            right.plot([m["step"] for m in evals], [m[name] for m in evals], marker="o", ms=3, label=label)
    right.set(xlabel="step", ylabel="nats per reply token", title="held-out KL")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "loss.png"), dpi=120)
    plt.close(fig)


def teacher_side(args, run, teacher_path, teacher_tok, processor, data, stage, eval_data, eval_stage):
    """
    The teacher's weights (None when a cache serves the whole run, or once a new cache is written) and its outputs
    for training (None: scored step by step) and held out (None without held-out data). An existing --teacher_cache
    is checked against every row of the run here; a new one is written here, after the teacher has scored them all.
    """
    train_rows, eval_rows = list(range(args.steps * args.batch_size)), list(range(args.eval_samples))
    if eval_data is None:
        eval_rows = []
    settings = cache_settings(args, teacher_path, teacher_tok)
    if args.teacher_cache and os.path.isfile(args.teacher_cache):
        cached = load_cache(args.teacher_cache, settings)
        for name, rows, d, st, answered in (("train", train_rows, data, stage, args.teacher_answers),
                                            ("eval", eval_rows, eval_data, eval_stage, False)):
            for i in range(0, len(rows), args.batch_size):
                teacher_batch(cached[name], processor, d, rows[i:i + args.batch_size], st, answered)
        run.say(f"teacher outputs from {args.teacher_cache}: {cached['train'].span()} for training, "
                f"{cached['eval'].span()} held out")
        return None, cached["train"], cached["eval"] if eval_rows else None
    teacher = load_model(teacher_path, run.device, run.dtype).requires_grad_(False)
    eval_outputs = score_replies(teacher, processor, eval_data, eval_rows, eval_stage, args, run, False,
                                 "the teacher") if eval_rows else None
    if not args.teacher_cache:
        return teacher, None, eval_outputs
    t0 = time.time()
    train_outputs = score_replies(teacher, processor, data, train_rows, stage, args, run, args.teacher_answers,
                                  f"--teacher_cache {args.teacher_cache}")
    save_cache(args.teacher_cache, {"train": train_outputs, "eval": eval_outputs}, settings)
    run.say(f"wrote {args.teacher_cache}: the teacher's top-{args.top_k} along {len(train_rows)} training and "
            f"{len(eval_rows)} held-out replies in {time.time() - t0:.0f}s; teacher freed")
    return None, train_outputs, eval_outputs


def main(argv=None):
    """The run: everything is read and checked before the first step or the first file written (except a new
    --teacher_cache, written once the teacher has scored every reply). Returns the metrics."""
    args = parse_args(argv)
    run = train.Run(args)
    if run.distributed:
        raise ValueError("distill.py runs in one process (start it with python, not torchrun)")
    data = open_data(args.data, "train", args.seed)
    eval_spec = args.eval_data or ("toy" if args.data == "toy" else "")
    eval_data = open_data(eval_spec, "val", args.seed) if eval_spec and args.eval_samples else None
    stage = TEXT_STAGE if TEXT_STAGE in data.stages else None
    eval_stage = TEXT_STAGE if eval_data is not None and TEXT_STAGE in eval_data.stages else None
    resume = train.latest_checkpoint(args.out_dir, run.say) if args.resume else None
    if not resume and not args.overwrite and os.path.isfile(os.path.join(args.out_dir, "latest")):
        raise FileExistsError(f"--out_dir {args.out_dir!r} holds a run; --resume it, choose another --out_dir, or "
                              "--overwrite it")

    # the models' tokenizers and configs, checked against each other before any weights are read
    teacher_path, teacher_tok, teacher_cfg, teacher_processor = read_teacher(args.teacher)
    tok, cfg, processor, start = student_setup(args, (teacher_path, teacher_tok, teacher_cfg, teacher_processor),
                                               resume)
    check_shared_vocabulary((args.teacher, teacher_tok, teacher_cfg), (resume or args.student, tok, cfg))
    if args.top_k > cfg.text.vocab_size:
        raise ValueError(f"--top_k {args.top_k}: more than the vocabulary ({cfg.text.vocab_size} logits)")
    teacher, train_outputs, eval_outputs = teacher_side(args, run, teacher_path, teacher_tok, processor, data, stage,
                                                        eval_data, eval_stage)
    torch.manual_seed(args.seed)
    args.init_from = start or ""                         # what train.build_model names in its errors
    student = train.build_model(args, cfg, start, resume, run)
    freeze_vision(student, args.unfreeze_vision)
    optimizer = train.make_optimizer(student, args, run.device)

    os.makedirs(args.out_dir, exist_ok=True)
    run.say(f"writing to {os.path.abspath(args.out_dir)}")
    step, metrics = 0, []
    if resume:
        step = train.load_checkpoint(resume, student, optimizer, run.rank)
        with open(os.path.join(args.out_dir, "metrics.jsonl")) as f:
            metrics = [m for m in map(json.loads, f) if m["step"] <= step]    # drop what was logged after the save
        run.say(f"resumed from {resume} at step {step}")
    train_student(args, run, student, optimizer, teacher, train_outputs, eval_outputs, tok, processor,
                  (data, stage), (eval_data, eval_stage), step, metrics)
    train.export_hf(student, tok, processor, os.path.join(args.out_dir, "hf"), run.rank,
                    getattr(torch, args.export_dtype))
    run.say(f"wrote {args.out_dir}/: loss.png, metrics.jsonl, checkpoints, hf/ (Hugging Face export)")
    return metrics


def train_student(args, run, student, optimizer, teacher, train_outputs, eval_outputs, tok, processor, train_data,
                  eval_data, step, metrics):
    """
    The loop from `step` to --steps: each step an on-policy or an off-policy batch (step_draws); the held-out KLs
    at the start, every --eval_every steps and at the end, each time with the plot and a checkpoint. train_data,
    eval_data: (dataset, stage). Appends to metrics and metrics.jsonl.
    """
    (data, stage), (eval_set, eval_stage) = train_data, eval_data
    with open(os.path.join(args.out_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(m) + "\n" for m in metrics)
    log = open(os.path.join(args.out_dir, "metrics.jsonl"), "a", buffering=1)           # line by line

    def evaluate(step):
        if eval_outputs is not None:
            kls = held_out_kls(student, teacher, eval_outputs, processor, eval_set, eval_stage, args, run)
            metrics.append(dict(step=step, **kls))
            log.write(json.dumps(metrics[-1]) + "\n")
            run.say(f"held-out at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in kls.items()))

    student.train()
    if step == 0:
        evaluate(0)
    while step < args.steps:
        t0 = time.time()
        on_policy, seed = step_draws(args, step)
        rows = list(range(step * args.batch_size, (step + 1) * args.batch_size))       # the step's data rows
        lr = train.cosine(step, args.steps, args.lr, args)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        if on_policy:
            loss, n = on_policy_loss(student, teacher, processor, data, rows, stage, args, run, seed)
        else:
            outputs = train_outputs or score_replies(teacher, processor, data, rows, stage, args, run,
                                                     args.teacher_answers, "the teacher")
            loss, n = off_policy_loss(student, outputs, processor, data, rows, stage, args, run, args.teacher_answers)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in student.parameters() if p.grad is not None], args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"the loss became {value} at step {step} (lr {lr:.2e}); stopped without saving: "
                                     f"the last good checkpoint in {args.out_dir} stays")
        kind = "on" if on_policy else "off"
        metrics.append(dict(step=step, batch=kind, loss=value, lr=lr, tokens=n))
        log.write(json.dumps(metrics[-1]) + "\n")
        run.say(f"step {step:5d}/{args.steps} | {kind:3s} | loss {value:.4f} | lr {lr:.2e} | {n} reply tokens | "
                f"{1000 * (time.time() - t0):.0f} ms", flush=True)
        if step == args.steps or (args.eval_every and step % args.eval_every == 0):
            evaluate(step)
            plot(args.out_dir, metrics)
            train.save_checkpoint(args.out_dir, student, optimizer, tok, processor, step, args, run.rank)
    log.close()


if __name__ == "__main__":
    train.cli(main)
