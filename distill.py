"""
Strong-to-weak distillation losses (Qwen3 report §4.5; Qwen3-VL report §4.3, text-only data, LLM backbone only):
the student's next-token distribution q is pulled towards the teacher's p, token by token, over the response tokens.

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
"""
import math

import torch
import torch.nn.functional as F


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
