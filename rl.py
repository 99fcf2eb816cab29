"""
Reinforcement learning with verifiable rewards (Qwen3-VL report §4.4): the policy losses, group advantages,
diagnostics, rewards that a program can check, and the loop that trains a policy with them.

    python rl.py --init_from out/toy --data toy --tasks count,think,attribute --algo sapo --out_dir out/rl
    python rl.py --init_from path/to/Qwen3-VL-2B-Instruct --data prompts.jsonl --algo grpo --lr 1e-6
    python rl.py --init_from ... --out_dir out/rl --resume        # continue exactly where a stopped run left off
    torchrun --nproc_per_node 8 rl.py --init_from ... --activation_checkpointing ...                # FSDP2

The three losses share one set-up. A prompt gets a group of G responses sampled from the behaviour policy pi_old
(sample.generate, repeated G times), each response a scalar reward, and each response the group-normalised
advantage A_i = (R_i - mean R) / (std R + 1e-6) (group_advantages). The ratio r_t = pi_theta(y_t) / pi_old(y_t)
is exp(logp - old_logp); it is exactly 1 on the first mini-batch of a rollout and moves away from 1 on later
ones. Each loss is -J, with J averaged over each response's own tokens, then over responses
("seq-mean-token-mean"), so every response weighs the same whatever its length. They differ in how they keep the
update near pi_old:
- GRPO (DeepSeekMath, arXiv 2402.03300): the PPO clipped surrogate per token, min(r A, clip(r, 1-eps, 1+eps) A),
  optionally minus beta times the k3 estimate of KL(pi_theta || pi_ref). A token that has already moved more than
  eps in the direction its advantage pushes gets no gradient; the clip is one-sided and hard.
- GSPO (arXiv 2507.18071, eq. 5-7, 13): the same clip applied to the sequence ratio s_i, the geometric mean of the
  response's token ratios, with a band ~1000x narrower (3e-4 / 4e-4). A whole response is in or out, and every
  token in it gets the same weight s_i A_i / |y_i|.
- SAPO (arXiv 2511.20347; the algorithm of Qwen3-VL's reasoning RL, §4.4.1): no clip and no KL; the token ratio
  goes through a smooth gate f(r) = (4/tau) sigmoid(tau (r - 1)), with tau = tau_pos for A > 0 and tau_neg for
  A <= 0. Its gradient weight is f'(r) = sech^2(tau (r - 1) / 2): exactly 1 at r = 1 (then the gradient is the
  plain policy gradient A grad log pi), symmetric in r - 1, in (0, 1], decaying like 4 exp(-tau |r - 1|).
  Off-policy tokens fade out smoothly and one at a time instead of being cut at a threshold; tau_neg > tau_pos
  makes negative-advantage tokens fade faster, since pushing a sampled token down spreads its probability over
  the whole vocabulary.
On-policy (r = 1) the three gradients are the same REINFORCE gradient.

The loop (main), one step: --prompts prompts (dataset.sample(index), the indices a function of the step), each
repeated --group_size times, are sampled in one batch by sample.generate with a torch.Generator seeded by (seed,
step), so a step's rollouts depend only on the step and the weights. generate's log-probs are the behaviour
policy's (the raw distribution at temperature 1, what a forward gives; --recompute_old_logp recomputes them with
the trainer's own forward instead, for when the two differ, e.g. in bf16). A response ends at its first EOS, or at
a visual placeholder token (<|image_pad|>, <|video_pad|>: fed back with no pixels behind it, it could not be read),
which belongs to it. Each reply gets its sample's reward (safe_reward: a failing reward scores 0 and is counted in
the log): a JSONL sample's "reward" (a name in REWARDS) against its "answer", else the dataset's own scorer (the
metric; the toy world's task scorers). Then --ppo_epochs passes of --minibatches optimizer steps each: the policy's
log-probs come from one forward over prompt + response (the images through the ViT once, the 3-D positions of the
response continuing the prompt's as in generation). Under torchrun every rank samples the whole step's rollouts (the
same batch, the same generator: FSDP's collectives stay in step, as in evaluation) and updates on its share of each
mini-batch. Checkpoints (train.save_checkpoint) every --save_every steps; --resume continues bitwise.

Rewards (one function each, (reply, answer) -> score in [0, 1]) read the reply's final answer: the text after its
last </think>, or the content of the last \\boxed{...} there. Qwen3-VL puts the answer format in the prompt rather
than rewarding it, but format_reward is here for tasks that want it. safe_reward turns a reward's failure into 0
and counts it, so that one malformed reply cannot stop or poison a training step.
"""
import argparse
import json
import math
import os
import re
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

import train
from data import Tasks, open_data
from eval import evaluate, reply_text
from processor import parse_grounding
from sample import generate

LOG_RATIO_LIMIT = 20.0          # log-ratios are clamped to +-20 before exp (as verl): finite even far off-policy
ADV_EPS = 1e-6                  # added to the group std


# ----------------------------------------------------------------------------------------------------------
# Shared pieces


def check_rl_args(group_size, tau_pos=1.0, tau_neg=1.05, allow_inverted_tau=False):
    """
    Validate an RL run's settings (the loop calls this once). group_size >= 2: a single response has no group to be
    compared with, so its advantage is 0 and it teaches nothing. tau_pos, tau_neg > 0, and tau_neg >= tau_pos (the
    SAPO paper's rule: negative-advantage tokens get the narrower gate) unless allow_inverted_tau, for ablations.
    """
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a lone response has zero advantage), got {group_size}")
    check_taus(tau_pos, tau_neg)
    if tau_neg < tau_pos and not allow_inverted_tau:
        raise ValueError(f"tau_neg ({tau_neg}) < tau_pos ({tau_pos}): SAPO wants tau_neg >= tau_pos (larger tau, "
                         f"narrower gate); pass allow_inverted_tau=True to run it anyway")


def check_taus(tau_pos, tau_neg):
    for name, tau in (("tau_pos", tau_pos), ("tau_neg", tau_neg)):
        if not tau > 0:
            raise ValueError(f"{name} must be > 0, got {tau}")


def clip_bounds(clip_eps):
    """clip_eps: eps (a symmetric band) or (eps_low, eps_high) -> the band (1 - eps_low, 1 + eps_high)."""
    low, high = clip_eps if isinstance(clip_eps, (tuple, list)) else (clip_eps, clip_eps)
    if not (0 <= low < 1 and high >= 0):
        raise ValueError(f"clip_eps must be eps or (eps_low, eps_high) with 0 <= eps_low < 1, eps_high >= 0, "
                         f"got {clip_eps}")
    return 1 - low, 1 + high


def token_advantages(advantages, mask):
    """advantages [B] (one per response) or [B, T] -> [B, T]."""
    if advantages.dim() == 1 and advantages.shape[0] == mask.shape[0]:
        return advantages[:, None].expand(mask.shape)
    if advantages.shape == mask.shape:
        return advantages
    raise ValueError(f"advantages must be [B] or [B, T] with [B, T] = {list(mask.shape)}, "
                     f"got {list(advantages.shape)}")


def log_ratio(logp, old_logp):
    """log r = logp - old_logp [B, T], clamped to +-LOG_RATIO_LIMIT; the gradient flows through logp only."""
    return (logp - old_logp.detach()).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)


def response_mean(values, mask):
    """values [B, T] -> [B]: each response's mean over its own tokens (0 for a response without tokens)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum(-1) / mask.sum(-1).clamp_min(1)


def seq_mean_token_mean(values, mask):
    """values [B, T] -> scalar: the mean over each response's tokens, then over responses."""
    return response_mean(values, mask).mean()


# ----------------------------------------------------------------------------------------------------------
# Advantages


def group_advantages(rewards, group_size):
    """
    rewards [N] float, N = number of prompts * group_size, each prompt's responses consecutive (as
    repeat_interleave makes them) -> advantages [N]: (R - group mean) / (group std + 1e-6), the std unbiased
    (Bessel, as torch.std and verl). A group whose rewards are all equal, including a group of one response, gets
    exact zeros: it says nothing about which response is better. (verl instead gives a one-response group its raw
    reward; purely group-relative, it is 0 here.)
    """
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"group_size ({group_size}) must be >= 1 and divide the number of rewards "
                         f"({rewards.numel()})")
    groups = rewards.reshape(-1, group_size)                                     # [N / G, G]
    centred = groups - groups.mean(-1, keepdim=True)
    std = groups.std(-1, keepdim=True) if group_size > 1 else torch.ones_like(centred)
    equal = groups.amax(-1, keepdim=True) == groups.amin(-1, keepdim=True)      # [N / G, 1]
    return torch.where(equal, 0.0, centred / (std + ADV_EPS)).reshape(-1)


# ----------------------------------------------------------------------------------------------------------
# Losses: logp [B, T] (the policy's log-probs of the sampled tokens, with gradient), old_logp [B, T] (the behaviour
# policy's, no gradient), advantages [B] or [B, T], mask [B, T] 1 on response tokens. Each returns the scalar to
# minimise.


def sapo_gate(ratio, tau):
    """f(r) = (4/tau) sigmoid(tau (r - 1)): f(1) = 2/tau, f'(1) = 1, 0 < f < 4/tau."""
    return 4 / tau * torch.sigmoid(tau * (ratio - 1))


def sapo_gate_weight(ratio, tau):
    """f'(r) = 4 p (1 - p), p = sigmoid(tau (r - 1)); = sech^2(tau (r - 1) / 2): the gate's factor on the gradient."""
    p = torch.sigmoid(tau * (ratio - 1))
    return 4 * p * (1 - p)


def sapo_taus(advantages, tau_pos, tau_neg):
    """[B, T] advantages -> [B, T] temperatures: tau_pos where A > 0, tau_neg where A <= 0."""
    return torch.where(advantages > 0, tau_pos, tau_neg).to(advantages.dtype)


def sapo_loss(logp, old_logp, advantages, mask, tau_pos=1.0, tau_neg=1.05):
    """
    -(1/B) sum_i (1/|y_i|) sum_t f_tau(r_t) A_t, tau by the sign of A_t. Gradient per token:
    -(1/B)(1/|y_i|) sech^2(tau (r - 1) / 2) r A grad logp, so on-policy (r = 1) it is REINFORCE's. No clipping, no
    KL term.
    """
    check_taus(tau_pos, tau_neg)
    adv = token_advantages(advantages, mask)                                     # [B, T]
    ratio = log_ratio(logp, old_logp).exp()                                      # [B, T]
    gate = sapo_gate(ratio, sapo_taus(adv, tau_pos, tau_neg))                    # [B, T]
    return seq_mean_token_mean(-gate * adv, mask)


def clipped_surrogate(ratio, adv, clip_eps):
    """Per-token PPO loss max(-r A, -clip(r, 1 - eps_low, 1 + eps_high) A) [B, T]; its gradient is 0 where it clips."""
    low, high = clip_bounds(clip_eps)
    return torch.maximum(-ratio * adv, -ratio.clamp(low, high) * adv)


def k3_kl(logp, ref_logp):
    """Per-token estimate of KL(pi_theta || pi_ref) [B, T]: exp(d) - d - 1 >= 0, d = ref_logp - logp (clamped)."""
    d = (ref_logp.detach() - logp).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    return d.exp() - d - 1


def grpo_loss(logp, old_logp, advantages, mask, clip_eps=0.2, ref_logp=None, kl_coef=0.0):
    """
    -(1/B) sum_i (1/|y_i|) sum_t [min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) - kl_coef k3(pi_theta, pi_ref)].
    clip_eps: eps or (eps_low, eps_high) (DAPO's clip-higher: (0.2, 0.28)). ref_logp [B, T]: the reference
    policy's log-probs, needed when kl_coef > 0.
    """
    adv = token_advantages(advantages, mask)                                     # [B, T]
    per_token = clipped_surrogate(log_ratio(logp, old_logp).exp(), adv, clip_eps)
    if kl_coef:
        if ref_logp is None:
            raise ValueError(f"kl_coef = {kl_coef} needs ref_logp")
        per_token = per_token + kl_coef * k3_kl(logp, ref_logp)
    return seq_mean_token_mean(per_token, mask)


def sequence_ratio(logp, old_logp, mask):
    """s_i = exp(mean_t log r_t) [B]: the geometric mean of a response's token ratios (GSPO eq. 7)."""
    return response_mean(log_ratio(logp, old_logp), mask).exp()


def gspo_loss(logp, old_logp, advantages, mask, clip_eps=(3e-4, 4e-4)):
    """
    -(1/B) sum_i min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i), written in the GSPO-token form (eq. 13):
    token t carries s_t = sg[s_i] pi_theta(y_t) / sg[pi_theta(y_t)] (value s_i, gradient s_i grad logp_t), clipped
    and averaged with seq-mean-token-mean. With one advantage per response this is exactly the sequence form;
    [B, T] advantages weigh each token by its own. Gradient: -(1/B) s_i A_i (1/|y_i|) grad logp_t inside the band.
    """
    adv = token_advantages(advantages, mask)                                     # [B, T]
    z = log_ratio(logp, old_logp)                                                # [B, T]
    log_s = response_mean(z, mask)                                               # [B]
    ratio = (log_s.detach()[:, None] + z - z.detach()).exp()                    # [B, T], value s_i
    return seq_mean_token_mean(clipped_surrogate(ratio, adv, clip_eps), mask)


# ----------------------------------------------------------------------------------------------------------
# Diagnostics for the training log


def clipped(ratio, adv, clip_eps):
    """[B, T] bool: tokens where the clipped surrogate is flat (no gradient): A > 0 and r > 1 + eps_high, or A < 0
    and r < 1 - eps_low."""
    low, high = clip_bounds(clip_eps)
    return ((adv > 0) & (ratio > high)) | ((adv < 0) & (ratio < low))


def batch_token_mean(values, mask):
    """values [B, T] (bool: the fraction where set) -> a float: the mean over all response tokens of the batch."""
    mask = mask.to(torch.float32)
    return float((values.float() * mask).sum() / mask.sum().clamp_min(1))


@torch.no_grad()
def loss_stats(logp, old_logp, advantages, mask, tau_pos=1.0, tau_neg=1.05, clip_eps=0.2,
               gspo_clip_eps=(3e-4, 4e-4)):
    """
    What the loop logs, as fractions of response tokens: how far the policy has moved (mean |r - 1|), and how many
    tokens each loss would keep from learning: SAPO gate weight below 0.5 (|r - 1| > 1.763 / tau), GRPO clipped,
    GSPO clipped (every token of a clipped response).
    """
    adv = token_advantages(advantages, mask)
    ratio = log_ratio(logp, old_logp).exp()
    seq_ratio = sequence_ratio(logp, old_logp, mask)[:, None].expand(mask.shape)
    gate = sapo_gate_weight(ratio, sapo_taus(adv, tau_pos, tau_neg))
    return {
        "ratio_dev": batch_token_mean((ratio - 1).abs(), mask),
        "sapo_gate_below_half": batch_token_mean(gate < 0.5, mask),
        "grpo_clip_fraction": batch_token_mean(clipped(ratio, adv, clip_eps), mask),
        "gspo_clip_fraction": batch_token_mean(clipped(seq_ratio, adv, gspo_clip_eps), mask),
    }


# ----------------------------------------------------------------------------------------------------------
# Rewards: (reply, answer) -> score in [0, 1]. `reply` is the model's text; `answer` the reference (a string, or for
# box_iou_reward / point_in_box also a list of numbers).

NUMBER = r"-?\d+(?:,\d{3}(?!\d))*(?:\.\d+)?"   # 3, -2.5, 1,234.5 (thousands commas)
PLAIN_NUMBER = r"-?\d+(?:\.\d+)?"                 # in a coordinate list, commas separate numbers


def last_boxed(text):
    r"""The content of the last \boxed{...} in text, braces matched (\boxed{\frac{1}{2}} -> \frac{1}{2}); None if
    there is none or it is not closed."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth < 0:
            return text[begin:i]
    return None


def final_answer(text):
    r"""A reply's answer: the text after its last </think>, or the content of the last \boxed{} there (None if that
    box is not closed), stripped."""
    text = text.rsplit("</think>", 1)[-1]
    if "\\boxed{" in text:
        boxed = last_boxed(text)
        return None if boxed is None else boxed.strip()
    return text.strip()


def normalize(text):
    """Lower case, single spaces, no surrounding spaces, punctuation or $, no leading "the "."""
    text = " ".join(text.lower().split()).strip(" .,!?;:\"'$")
    return text.removeprefix("the ")


def exact_match(reply, answer):
    """1 if the normalised final answers are equal."""
    guess, truth = final_answer(reply), final_answer(answer)
    return float(guess is not None and truth is not None and normalize(guess) == normalize(truth))


def last_number(text):
    """The last number in text (thousands commas dropped), or None."""
    numbers = re.findall(NUMBER, text or "")
    return float(numbers[-1].replace(",", "")) if numbers else None


def number_match(reply, answer):
    """1 if the last number of the reply's final answer equals the reference's as a number ("7.0" = "7", "1,234" =
    "1234")."""
    guess, truth = last_number(final_answer(reply)), last_number(final_answer(answer))
    return float(guess is not None and guess == truth)


def choice_letter(text):
    """
    The option letter a final answer starts with: a capital A-Z, optionally in parentheses, alone or followed by
    ")", "." or ":" ("B", "(B)", "B.", "B) a cat", "Answer: B"), None otherwise ("A cat" is not a choice).
    """
    if text is None:
        return None
    text = re.sub(r"^(?:the )?answer(?: is)?\s*:?\s*", "", text.strip(), flags=re.I)
    m = re.match(r"\(?([A-Z])(?:[).:]|\s*$)", text)
    return m.group(1) if m else None


def choice_match(reply, answer):
    """1 if the reply's option letter is the reference's."""
    guess, truth = choice_letter(final_answer(reply)), choice_letter(final_answer(answer))
    return float(guess is not None and guess == truth)


def numbers_in_brackets(text, n):
    """The first [..] list of exactly n numbers in text, as floats, or None."""
    for inside in re.findall(r"\[([^\[\]]*)\]", text):
        numbers = re.findall(PLAIN_NUMBER, inside)
        if len(numbers) == n and re.fullmatch(r"[\s\d.,\-]*", inside):
            return [float(v) for v in numbers]
    return None


def first_box(x):
    """
    A box [x1, y1, x2, y2] in the [0, 1000] frame from a reply (the first "bbox_2d" of its JSON, else its first
    [..] list of four numbers) or from a list of four numbers; None if there is none or it is empty (x1 >= x2 or
    y1 >= y2).
    """
    if isinstance(x, str):
        items = [item["bbox_2d"] for item in parse_grounding(x) if "bbox_2d" in item]
        x = items[0] if items else numbers_in_brackets(x, 4)
    if x is None or len(x) != 4:
        return None
    box = [float(v) for v in x]
    return box if box[0] < box[2] and box[1] < box[3] else None


def first_point(text):
    """A point [x, y] from a reply: the first "point_2d" of its JSON, else its first [..] list of two numbers."""
    items = [item["point_2d"] for item in parse_grounding(text) if "point_2d" in item]
    return [float(v) for v in items[0]] if items else numbers_in_brackets(text, 2)


def interval_iou(a, b):
    """The IoU of two intervals (start, end) with start < end."""
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    return inter / ((a[1] - a[0]) + (b[1] - b[0]) - inter)


def box_iou(a, b):
    """IoU of two boxes [x1, y1, x2, y2] with x1 < x2, y1 < y2."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def box_iou_reward(reply, answer):
    """The continuous IoU of the reply's box with the reference box (both in the [0, 1000] frame); 0 without a box."""
    guess, truth = first_box(final_answer(reply) or ""), first_box(answer)
    return box_iou(guess, truth) if guess and truth else 0.0


def point_in_box(reply, answer):
    """1 if the reply's point lies in the reference box (edges included), both in the [0, 1000] frame."""
    point, box = first_point(final_answer(reply) or ""), first_box(answer)
    return float(point is not None and box is not None
                 and box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3])


def time_span(text):
    """
    A time span (start, end) in seconds: the first two non-negative numbers of the text, written as timestamps
    "<1.0 seconds> to <3.5 seconds>" (the format of the video prompts) or plainly "from 1.0 to 3.5 seconds",
    "1-3.5 s"; None if there are fewer than two or start >= end.
    """
    times = [float(t) for t in re.findall(r"\d+(?:\.\d+)?", text or "")[:2]]
    return tuple(times) if len(times) == 2 and times[0] < times[1] else None


def temporal_iou(reply, answer):
    """The IoU of the reply's time span with the reference span; 0 without a well-formed span."""
    guess, truth = time_span(final_answer(reply)), time_span(final_answer(answer))
    return interval_iou(guess, truth) if guess and truth else 0.0


def format_reward(reply, answer=None):
    """
    1 if the reply is one <think>...</think> block (the reasoning, possibly empty) then a non-empty answer, with no
    other think tag; 0 otherwise. `answer` is unused (every reward takes (reply, answer)).
    """
    m = re.fullmatch(r"\s*<think>(.*?)</think>(.*)", reply, flags=re.S)
    return float(m is not None and "<think>" not in m.group(1) and bool(m.group(2).strip())
                 and not re.search(r"</?think>", m.group(2)))


REWARDS = {
    "exact": exact_match,
    "number": number_match,
    "choice": choice_match,
    "box_iou": box_iou_reward,
    "point": point_in_box,
    "temporal_iou": temporal_iou,
    "format": format_reward,
}

reward_failures = Counter()     # "<reward name>: raised | nan | out of range" -> count; the loop logs and clears it


def safe_reward(fn, reply, answer):
    """fn(reply, answer) as a float in [0, 1]; an exception, NaN or a value outside [0, 1] gives 0 and is counted in
    reward_failures."""
    try:
        score = float(fn(reply, answer))
    except Exception:
        reward_failures[f"{fn.__name__}: raised"] += 1
        return 0.0
    if math.isnan(score):
        reward_failures[f"{fn.__name__}: nan"] += 1
        return 0.0
    if not 0 <= score <= 1:
        reward_failures[f"{fn.__name__}: out of range"] += 1
        return 0.0
    return score


# ----------------------------------------------------------------------------------------------------------
# The loop: rollouts -> rewards -> group advantages -> mini-batch updates

LOSSES = {"sapo": sapo_loss, "grpo": grpo_loss, "gspo": gspo_loss}
CLIP_EPS = {"grpo": (0.2, 0.2), "gspo": (3e-4, 4e-4)}          # the default band of each clipped loss


def encode_prompt(processor, sample):
    """A sample's prompt (its messages before the reply) with the generation prompt, as the model reads it: ids [L]
    and its pixels and grids (None where it has none)."""
    b = processor([sample["prompt"]], add_generation_prompt=True)
    return dict(ids=b["input_ids"][0], pv=b["pixel_values"], ig=b["image_grid_thw"], pvv=b["pixel_values_videos"],
                vg=b["video_grid_thw"], vs=b["video_second_per_grid"])


def batch_inputs(prompts, pad_id, responses=None, keep=None):
    """
    Rows of encoded prompts (one per row) -> the model's inputs: input_ids and attention_mask [B, S], left-padded
    to the longest prompt as the processor pads, and the rows' pixels and grids in row order. With responses
    [B, T] and keep [B, T] bool (the response tokens fed back: those before its stop token), the responses follow
    the prompts: [B, S + T], the rest of each response padding. No position ids: the model computes them from the
    ids, the grids and the attention mask (rope_index), and a response's continue from its prompt's as the decode
    steps of generation do (max prompt position + 1 + t).
    """
    B, S = len(prompts), max(len(p["ids"]) for p in prompts)
    input_ids = torch.full((B, S), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, S, dtype=torch.long)
    for b, p in enumerate(prompts):
        input_ids[b, S - len(p["ids"]):] = p["ids"]
        attention_mask[b, S - len(p["ids"]):] = 1
    if responses is not None:
        input_ids = torch.cat([input_ids, responses.masked_fill(~keep, pad_id)], 1)               # [B, S + T]
        attention_mask = torch.cat([attention_mask, keep.long()], 1)

    def media(key):
        parts = [p[key] for p in prompts if p[key] is not None]
        return torch.cat(parts) if parts else None
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=media("pv"),
                image_grid_thw=media("ig"), pixel_values_videos=media("pvv"), video_grid_thw=media("vg"),
                video_second_per_grid=media("vs"))


def response_masks(tokens, stop_ids):
    """
    tokens [B, T] generated -> mask [B, T] float: each response's tokens, up to and including its first stop token
    (all T without one); keep [B, T] bool: those strictly before it (the ones a forward reads as inputs).
    """
    stop = torch.isin(tokens, torch.tensor(stop_ids, dtype=tokens.dtype))                     # [B, T]
    after = (stop.long().cumsum(1) - stop.long()) > 0                                         # past the first stop
    return (~after).float(), ~after & ~stop


@dataclass
class Rollouts:
    """A step's N = prompts x G responses, the G of a prompt consecutive; tensors on the CPU."""
    prompts: list               # [N] the encoded prompt of each response
    responses: torch.Tensor     # [N, T] long: the sampled ids, T the longest response
    mask: torch.Tensor          # [N, T] float: the response's tokens, up to and including its stop token
    keep: torch.Tensor          # [N, T] bool: those before the stop token
    old_logp: torch.Tensor      # [N, T] float32: the behaviour policy's log-probs of the sampled ids (0 off mask)
    stopped: torch.Tensor       # [N] bool: the response ended with a stop token (else max_new_tokens cut it)
    replies: list               # [N] the responses' text
    pad_id: int                 # what stands for the tokens after a response's stop token in a forward


def make_rollouts(prompts, tokens, logprobs, tok):
    """Generated tokens [N, max_new_tokens] and their log-probs (one row per prompt in `prompts`) -> Rollouts:
    responses cut at their stop token (an EOS or a visual placeholder), trimmed to the longest."""
    stop_ids = list(tok.eos_ids) + [tok.image_token_id, tok.video_token_id]
    mask, keep = response_masks(tokens, stop_ids)
    T = int(mask.sum(1).max())
    tokens, mask, keep = tokens[:, :T], mask[:, :T], keep[:, :T]
    stopped = (mask.bool() & ~keep).any(1)
    replies = [reply_text(tok, ids[m.bool()].tolist()) for ids, m in zip(tokens, mask)]
    return Rollouts(prompts, tokens, mask, keep, logprobs[:, :T].float() * mask, stopped, replies, tok.pad_id)


@torch.no_grad()
def rollout(model, processor, prompts, args, generator, run):
    """Each prompt group_size times in one batch, sampled by generate with its log-probs -> Rollouts."""
    tok = processor.tok
    rows = [p for p in prompts for _ in range(args.group_size)]
    inputs = to_device(batch_inputs(rows, tok.pad_id), run.device)
    with run.autocast:
        tokens, logprobs = generate(model, **inputs, max_new_tokens=args.max_new_tokens,
                                    temperature=args.temperature, eos_ids=tok.eos_ids, pad_id=tok.pad_id,
                                    generator=generator, return_logprobs=True)
    return make_rollouts(rows, tokens.cpu(), logprobs.cpu(), tok)


def to_device(batch, device):
    return {k: v.to(device) if v is not None else None for k, v in batch.items()}


def policy_logprobs(model, inputs, responses, run_vision=False):
    """
    One forward over prompt + responses (inputs from batch_inputs; responses [B, T] on the model's device) -> the
    policy's log-probs of the response tokens logp [B, T] float32 (with gradient) and the entropy of its next-token
    distribution at each of them [B, T] (no gradient). The hidden state at position S - 1 + t predicts response
    token t; only those T positions go through the head (no [B, S + T, V] logits).
    """
    T = responses.shape[1]
    hidden, _ = model(**inputs, return_hidden=True, run_vision=run_vision)                     # [B, S + T, H]
    logp_all = model.lm_head(hidden[:, -T - 1:-1]).float().log_softmax(-1)                     # [B, T, V]
    logp = logp_all.gather(-1, responses[..., None])[..., 0]                                   # [B, T]
    entropy = -(logp_all.exp() * logp_all).sum(-1).detach()                                    # [B, T]
    return logp, entropy


def reward(data, sample, reply):
    """A reply's reward in [0, 1]: the sample's named reward (REWARDS) against its answer, else the dataset's own
    scorer; 0 (counted in reward_failures) when it fails."""
    if "reward" in sample:
        return safe_reward(REWARDS[sample["reward"]], reply, sample["answer"])

    def score(reply, sample):
        return data.score(sample, reply)
    score.__name__ = f"{sample['task']} score"
    return safe_reward(score, reply, sample)


def loss_settings(args):
    """The chosen loss's keyword arguments, and those loss_stats takes (the chosen band, the others' defaults)."""
    clip = args.clip_eps or CLIP_EPS.get(args.algo)
    kwargs = dict(sapo=dict(tau_pos=args.tau_pos, tau_neg=args.tau_neg), grpo=dict(clip_eps=clip),
                  gspo=dict(clip_eps=clip))[args.algo]
    stats = dict(tau_pos=args.tau_pos, tau_neg=args.tau_neg,
                 clip_eps=clip if args.algo == "grpo" else CLIP_EPS["grpo"],
                 gspo_clip_eps=clip if args.algo == "gspo" else CLIP_EPS["gspo"])
    return kwargs, stats


def update(model, optimizer, rollouts, advantages, args, run):
    """
    --ppo_epochs passes over the rollouts, each --minibatches optimizer steps on consecutive rows; every rank takes
    its share of each mini-batch (FSDP averages the ranks' gradients: the loss of the whole mini-batch). Returns
    the statistics over all of the step's forwards: token means of the entropy and of loss_stats, the mean loss
    and gradient norm (before clipping).
    """
    N = len(rollouts.prompts)
    size = N // args.minibatches
    share = size // run.world_size
    kwargs, stat_kwargs = loss_settings(args)
    loss_fn = partial(LOSSES[args.algo], **kwargs)
    slices = [slice(m * size + run.rank * share, m * size + (run.rank + 1) * share) for m in range(args.minibatches)]

    def forward(rows):
        inputs = to_device(batch_inputs(rollouts.prompts[rows], rollouts.pad_id, rollouts.responses[rows],
                                        rollouts.keep[rows]), run.device)
        with run.autocast:
            return policy_logprobs(model, inputs, rollouts.responses[rows].to(run.device), run.distributed)

    old_logp = rollouts.old_logp.to(run.device)
    if args.recompute_old_logp:                     # the behaviour policy's log-probs from the trainer's forward
        with torch.no_grad():
            for rows in slices:
                old_logp[rows] = forward(rows)[0] * rollouts.mask[rows].to(run.device)
    token_means = ["entropy", "ratio_dev", "sapo_gate_below_half", "grpo_clip_fraction", "gspo_clip_fraction"]
    sums = torch.zeros(2 + len(token_means), dtype=torch.float64)    # tokens, loss, token-weighted token_means
    grad_norms = []
    for _ in range(args.ppo_epochs):
        for rows in slices:
            mask, adv = rollouts.mask[rows].to(run.device), advantages[rows].to(run.device)
            logp, entropy = forward(rows)
            loss = loss_fn(logp, old_logp[rows], adv, mask)
            loss.backward()
            # the parameters as registered now, after the backward: FSDP swaps the root's between its sharded and
            # unsharded tensors around a forward, and only the sharded ones hold the gradients
            norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None],
                                                  args.grad_clip or math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            n = float(mask.sum())
            values = dict(entropy=float((entropy * mask).sum()) / n,
                          **loss_stats(logp.detach(), old_logp[rows], adv, mask, **stat_kwargs))
            sums += torch.tensor([n, loss.item(), *(n * values[k] for k in token_means)], dtype=torch.float64)
            grad_norms.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
    if run.distributed:                             # on the rank's device: NCCL reduces only CUDA tensors
        sums = sums.to(run.device)
        dist.all_reduce(sums)
    updates = args.ppo_epochs * args.minibatches
    return dict({k: float(sums[2 + i] / sums[0]) for i, k in enumerate(token_means)},
                loss=float(sums[1]) / (updates * run.world_size), grad_norm=sum(grad_norms) / updates)


def step_samples(data, step, n):
    """The samples of a step: indices [step * n, (step + 1) * n), so a step's prompts depend only on its number."""
    return [data.sample(i) for i in range(step * n, (step + 1) * n)]


def rl_step(step, model, optimizer, processor, data, args, run):
    """One step (0-based): sample, score, update. Returns its log entry (step = the number of steps done)."""
    t0 = time.time()
    samples = step_samples(data, step, args.prompts)
    prompts = [encode_prompt(processor, s) for s in samples]
    generator = torch.Generator(run.device).manual_seed(args.seed * 2**31 + step)
    rollouts = rollout(model, processor, prompts, args, generator, run)
    t1 = time.time()
    rows = [s for s in samples for _ in range(args.group_size)]
    rewards = torch.tensor([reward(data, s, r) for s, r in zip(rows, rollouts.replies)])        # [N]
    advantages = group_advantages(rewards, args.group_size)                                      # [N]
    by_task = {}
    for s, r in zip(rows, rewards.tolist()):
        by_task.setdefault(s["task"], []).append(r)
    failures = dict(reward_failures)
    reward_failures.clear()
    t2 = time.time()
    lr = train.cosine(step, args.steps, args.lr, args)
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]
    stats = update(model, optimizer, rollouts, advantages, args, run)
    if not math.isfinite(stats["loss"]):
        raise FloatingPointError(f"the loss became {stats['loss']} at step {step + 1} (lr {lr:.2e}); stopped "
                                 f"without saving: the last good checkpoint in {args.out_dir} stays")
    return dict(step=step + 1, lr=lr, reward=float(rewards.mean()),
                reward_by_task={t: sum(v) / len(v) for t, v in sorted(by_task.items())},
                response_length=float(rollouts.mask.sum(1).mean()),
                truncated=float((~rollouts.stopped).float().mean()), **stats, reward_failures=failures,
                time=dict(rollout=t1 - t0, scoring=t2 - t1, update=time.time() - t2))


def evaluation(model, processor, eval_data, args, run, step):
    """Greedy replies to eval_data's samples (--eval_samples per task), scored: a log entry."""
    results, _ = evaluate(model, processor, eval_data, args.eval_samples, run.device, run.autocast,
                          args.max_new_tokens)
    return dict(step=step, eval={t: r["score"] for t, r in results.items()})


def describe(m, algo):
    """A step's log entry as one line."""
    held = dict(sapo=("gate<0.5", "sapo_gate_below_half"), grpo=("clipped", "grpo_clip_fraction"),
                gspo=("clipped", "gspo_clip_fraction"))[algo]
    tasks = " ".join(f"{t} {r:.2f}" for t, r in m["reward_by_task"].items())
    failed = f" | {sum(m['reward_failures'].values())} rewards failed" if m["reward_failures"] else ""
    t = m["time"]
    return (f"step {m['step']:5d} | reward {m['reward']:.3f} ({tasks}) | len {m['response_length']:.1f} | "
            f"entropy {m['entropy']:.3f} | {held[0]} {m[held[1]]:.3f} | grad {m['grad_norm']:.3f}{failed} | "
            f"rollout {t['rollout']:.1f}s scoring {t['scoring']:.1f}s update {t['update']:.1f}s")


def rl_loop(args, run, model, optimizer, tok, processor, data, eval_data, step, metrics):
    """Steps from `step` to --steps; evaluation at the start, every --eval_every steps and at the end; a
    checkpoint and the plots every --save_every steps and at the end. Returns the metrics."""
    log = open(os.path.join(args.out_dir, "metrics.jsonl"), "w", buffering=1) if run.rank == 0 else None
    if log:
        log.writelines(json.dumps(m) + "\n" for m in metrics)

    def record(entry):
        metrics.append(entry)
        if log:
            log.write(json.dumps(entry) + "\n")

    evaluating = eval_data is not None and args.eval_samples > 0
    if step == 0 and evaluating:
        record(evaluation(model, processor, eval_data, args, run, 0))
        run.say("eval  " + "  ".join(f"{k} {v:.2f}" for k, v in metrics[-1]["eval"].items()))
    model.train()
    while step < args.steps:
        record(rl_step(step, model, optimizer, processor, data, args, run))
        step += 1
        if step % args.log_every == 0 or step == 1:
            run.say(describe(metrics[-1], args.algo), flush=True)
        last = step == args.steps
        if evaluating and (last or (args.eval_every and step % args.eval_every == 0)):
            record(evaluation(model, processor, eval_data, args, run, step))
            run.say("eval  " + "  ".join(f"{k} {v:.2f}" for k, v in metrics[-1]["eval"].items()))
        if last or step % args.save_every == 0:
            if run.rank == 0:
                train.plot(args.out_dir, metrics, [("rl", args.steps)], eval_data.chance if eval_data else {},
                           curve="reward")
            train.save_checkpoint(args.out_dir, model, optimizer, tok, processor, step, args, run.rank)
    if log:
        log.close()
    return metrics


# ----------------------------------------------------------------------------------------------------------
# Command line


def get_parser():
    p = argparse.ArgumentParser(description="Reinforcement learning with verifiable rewards (SAPO, GRPO, GSPO).",
                                formatter_class=train.Formatter)
    # model and data
    p.add_argument("--init_from", required=True, help="the policy to start from: a Hugging Face Qwen3-VL "
                   "directory, a train.py checkpoint, or a train.py / rl.py output directory (its latest checkpoint)")
    p.add_argument("--tokenizer", default="", help="a ranks file or HF directory (default: the checkpoint's)")
    p.add_argument("--data", default="toy", help="'toy' (the toy world's training split) or JSONL prompts with "
                   "an \"answer\" (and optionally a \"reward\"), with weights: a.jsonl:3,b.jsonl:1")
    p.add_argument("--tasks", default="", help="train (and evaluate) only these tasks, comma-separated "
                   "(default: all of the data's)")
    p.add_argument("--eval_data", default="", help="JSONL files scored (greedy) at the start, every --eval_every "
                   "steps and at the end (default: the toy world's validation split with --data toy, else none)")
    p.add_argument("--image_size", type=int, default=96, help="the toy world's image side in pixels")
    p.add_argument("--min_pixels", type=int, default=0, help="image pixel budget, lower (0: the checkpoint's)")
    p.add_argument("--max_pixels", type=int, default=0, help="image pixel budget, upper (0: the checkpoint's)")
    # the algorithm
    p.add_argument("--algo", default="sapo", choices=list(LOSSES), help="the policy loss")
    p.add_argument("--steps", type=int, default=100, help="RL steps (one rollout batch each)")
    p.add_argument("--prompts", type=int, default=32, help="prompts per step (over all ranks)")
    p.add_argument("--group_size", type=int, default=16, help="responses per prompt (G; the report's 16)")
    p.add_argument("--minibatches", type=int, default=2, help="optimizer steps per pass over a step's rollouts")
    p.add_argument("--ppo_epochs", type=int, default=1, help="passes over a step's rollouts")
    p.add_argument("--max_new_tokens", type=int, default=512, help="longest response (also in evaluation)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the rollouts (the "
                   "log-probs are the raw distribution's: at 1 they are the sampler's)")
    p.add_argument("--tau_pos", type=float, default=1.0, help="SAPO gate temperature for A > 0")
    p.add_argument("--tau_neg", type=float, default=1.05, help="SAPO gate temperature for A <= 0 (>= tau_pos)")
    p.add_argument("--allow_inverted_tau", action="store_true", help="allow tau_neg < tau_pos (ablations)")
    p.add_argument("--clip_eps", default="", help="GRPO / GSPO clip band: eps or eps_low,eps_high (default: "
                   "0.2 for GRPO, 3e-4,4e-4 for GSPO)")
    p.add_argument("--recompute_old_logp", action="store_true", help="the behaviour log-probs from a forward "
                   "pass before the updates instead of the sampler's (when they differ: bf16, a compiled sampler)")
    # optimisation
    p.add_argument("--lr", type=float, default=1e-6, help="learning rate (constant after --warmup; verl's 1e-6)")
    p.add_argument("--warmup", type=int, default=0, help="linear warmup steps")
    p.add_argument("--min_lr_ratio", type=float, default=1.0, help="cosine floor as a fraction of --lr (1: "
                   "constant)")
    p.add_argument("--vision_lr_mult", type=float, default=1.0, help="the ViT's learning rate as a fraction of --lr")
    p.add_argument("--weight_decay", type=float, default=0.01)
    p.add_argument("--beta2", type=float, default=0.999)
    p.add_argument("--grad_clip", type=float, default=1.0, help="global gradient norm limit (0: off)")
    # evaluation, logging, checkpoints
    p.add_argument("--eval_every", type=int, default=0, help="steps between evaluations (0: start and end only)")
    p.add_argument("--eval_samples", type=int, default=32, help="evaluation samples per task (0: none)")
    p.add_argument("--log_every", type=int, default=1)
    p.add_argument("--save_every", type=int, default=50, help="steps between checkpoints (and at the end)")
    p.add_argument("--out_dir", default="out/rl")
    p.add_argument("--resume", action="store_true", help="continue from out_dir's latest good checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start anew in an out_dir that holds a run")
    p.add_argument("--keep_checkpoints", type=int, default=2)
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    # system
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (auto: cuda if available); torchrun: one GPU "
                   "per rank")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="compute dtype (auto: bf16 on cuda)")
    p.add_argument("--activation_checkpointing", action="store_true", help="recompute each block in the backward")
    p.add_argument("--export_dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--seed", type=int, default=0, help="seeds the rollouts (with the step)")
    return p


AT_LEAST = dict(steps=1, prompts=1, group_size=1, minibatches=1, ppo_epochs=1, max_new_tokens=1, warmup=0,
                eval_every=0, eval_samples=0, log_every=1, save_every=1, keep_checkpoints=1, image_size=32,
                min_pixels=0, max_pixels=0, seed=0)


def parse_args(argv=None):
    """The flags, every value checked (a bad one exits with its name and what is allowed)."""
    parser = get_parser()
    args = parser.parse_args(argv)
    for name, least in AT_LEAST.items():
        if getattr(args, name) < least:
            parser.error(f"--{name} {getattr(args, name)}: must be >= {least}")
    if args.seed >= 2**32:
        parser.error(f"--seed {args.seed}: must be < 2**32")
    for name in ("lr", "min_lr_ratio", "vision_lr_mult", "weight_decay", "grad_clip", "temperature"):
        if not 0 <= getattr(args, name) < float("inf") or (name == "lr" and args.lr == 0):
            parser.error(f"--{name} {getattr(args, name)}: must be a finite number >= 0" + (" (> 0)" if name == "lr"
                                                                                          else ""))
    if not 0 < args.beta2 < 1:
        parser.error(f"--beta2 {args.beta2}: must be in (0, 1)")
    try:
        check_rl_args(args.group_size, args.tau_pos, args.tau_neg, args.allow_inverted_tau)
        if args.clip_eps:
            if args.algo == "sapo":
                raise ValueError("--clip_eps is GRPO's and GSPO's: SAPO has no clip (its gate: --tau_pos, --tau_neg)")
            try:
                values = tuple(float(v) for v in args.clip_eps.split(","))
            except ValueError:
                values = ()
            if len(values) not in (1, 2):
                raise ValueError(f"--clip_eps {args.clip_eps!r}: give eps or eps_low,eps_high")
            args.clip_eps = values * (3 - len(values))          # (eps, eps) or (eps_low, eps_high)
            clip_bounds(args.clip_eps)
    except ValueError as e:
        parser.error(str(e))
    if (args.prompts * args.group_size) % args.minibatches:
        parser.error(f"--prompts x --group_size ({args.prompts * args.group_size} responses) must divide into "
                     f"--minibatches {args.minibatches}")
    args.arch_overrides = {}          # the policy's architecture is its checkpoint's (train.tokenizer_and_config)
    args.cp = 1                       # rollouts decode whole sequences: no context parallelism
    return args


def open_datasets(args):
    """The prompts (JSONL files checked line by line here; an "answer" stands for the reply) and the evaluation set,
    both restricted to --tasks."""
    data = open_data(args.data, "train", args.seed, args.image_size, strict=False)
    eval_spec = args.eval_data or ("toy" if args.data == "toy" else "")
    eval_data = open_data(eval_spec, "val", args.seed, args.image_size, strict=False) if eval_spec else None
    if args.tasks:
        tasks = args.tasks.split(",")
        data = Tasks(data, tasks)
        eval_data = Tasks(eval_data, tasks) if eval_data is not None else None
    return data, eval_data


def main(argv=None):
    """The run: everything is checked and set up before the first file is written. Returns its metrics."""
    args = parse_args(argv)
    run = train.Run(args)
    if (args.prompts * args.group_size // args.minibatches) % run.world_size:
        raise ValueError(f"a mini-batch of {args.prompts * args.group_size // args.minibatches} responses does not "
                         f"split over {run.world_size} ranks: change --prompts, --group_size or --minibatches")
    data, eval_data = open_datasets(args)
    resume = train.checkpoint_to_resume(args, run.say)
    tok, cfg, start = train.tokenizer_and_config(args, data, resume, run.say)
    model = train.build_model(args, cfg, start, resume, run)
    processor = train.make_processor(args, start or resume, tok, data, cfg)
    encode_prompt(processor, data.sample(0))            # the first prompt reads and fits before anything is written
    os.makedirs(args.out_dir, exist_ok=True)
    run.say(f"writing to {os.path.abspath(args.out_dir)}")
    optimizer = train.make_optimizer(model, args, run.device)
    step, metrics = 0, []
    if resume:
        step = train.load_checkpoint(resume, model, optimizer, run.rank)
        metrics = train.logged_metrics(args.out_dir, step)
        run.say(f"resumed from {resume} at step {step}")
    metrics = rl_loop(args, run, model, optimizer, tok, processor, data, eval_data, step, metrics)
    train.export_hf(model, tok, processor, os.path.join(args.out_dir, "hf"), run.rank,
                    getattr(torch, args.export_dtype))
    run.say(f"wrote {args.out_dir}/: metrics.jsonl, reward.png, metrics.png, hf/ (Hugging Face export)")
    if run.distributed:
        dist.destroy_process_group()
    return metrics


if __name__ == "__main__":
    train.cli(main)
