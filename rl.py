"""
Reinforcement learning with verifiable rewards (Qwen3-VL report §4.4): the policy losses, group advantages,
diagnostics, and rewards that a program can check.

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

Rewards (one function each, (reply, answer) -> score in [0, 1]) read the reply's final answer: the text after its
last </think>, or the content of the last \\boxed{...} there. Qwen3-VL puts the answer format in the prompt rather
than rewarding it, but format_reward is here for tasks that want it. safe_reward turns a reward's failure into 0
and counts it, so that one malformed reply cannot stop or poison a training step.
"""
import math
import re
from collections import Counter

import torch

from processor import parse_grounding

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
