"""distill.py against the math (shared/reference/post_training.md §4, properties of §6 "Distillation losses"): signs
and zeros of the divergences, gradients by autograd against closed forms, the reference values of the appendix,
JSD's bounds, limits and endpoints, temperature (no T^2 factor), top-k with a tail bucket, masking, arguments."""
import math

import pytest
import torch

from distill import forward_kl, forward_kl_topk, jsd, reverse_kl, teacher_topk

B, T, V = 2, 4, 7
MASK = torch.tensor([[1.0, 1, 1, 0], [0, 1, 1, 0]])         # N = 5 tokens
N = int(MASK.sum())


def logits(seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(B, T, V, generator=g, dtype=torch.float64)


def student_grad(loss_fn, student, *args, **kw):
    student = student.clone().requires_grad_()
    loss_fn(student, *args, **kw).backward()
    return student.grad


def exact_kl(log_a, log_b):
    """KL(a || b) per position [B, T] from log-probs [B, T, V]."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def masked_mean(x):
    return (x * MASK).sum() / N


def test_kls_nonnegative_and_zero_only_for_equal_distributions():
    """§6 Distillation 1: every divergence is > 0 for different distributions and 0 when the logits differ by a
    per-token constant (the same distribution)."""
    for seed in range(5):
        s, t = logits(seed), logits(seed + 100)
        for loss in [forward_kl, reverse_kl, jsd]:
            assert loss(s, t, MASK) > 1e-3
        shifted = t + torch.randn(B, T, 1, dtype=torch.float64)
        for loss in [forward_kl, reverse_kl, jsd]:
            assert loss(shifted, t, MASK).abs() < 1e-12
        assert forward_kl(shifted, t, MASK, top_k=3).abs() < 1e-12


def test_reference_values():
    """Appendix: P = (.7, .2, .1) teacher, Q = (.4, .4, .2) student: KL(P||Q) = 0.18379, KL(Q||P) = 0.19204,
    JSD(0.5) = 0.04620."""
    p = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64).log().expand(1, 1, 3)
    q = torch.tensor([0.4, 0.4, 0.2], dtype=torch.float64).log().expand(1, 1, 3)
    one = torch.ones(1, 1)
    assert forward_kl(q, p, one).item() == pytest.approx(0.18379, abs=1e-5)
    assert reverse_kl(q, p, one).item() == pytest.approx(0.19204, abs=1e-5)
    assert jsd(q, p, one).item() == pytest.approx(0.04620, abs=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_forward_kl_gradient(temperature):
    """§6 Distillation 1 and §4.2: d forward_kl / d student logits = (softmax(s/T) - softmax(t/T)) / (T N) at the N
    masked tokens (no T^2 factor), 0 elsewhere."""
    s, t = logits(0), logits(1)
    expected = (torch.softmax(s / temperature, -1) - torch.softmax(t / temperature, -1)) / (temperature * N)
    torch.testing.assert_close(student_grad(forward_kl, s, t, MASK, temperature), expected * MASK[..., None])


def test_reverse_kl_gradient():
    """§6 Distillation 1: d KL(q || p) / d z_student = q (log q - log p - KL(q || p)), per masked token / N."""
    s, t = logits(2), logits(3)
    log_q, log_p = s.log_softmax(-1), t.log_softmax(-1)
    expected = log_q.exp() * (log_q - log_p - exact_kl(log_q, log_p)[..., None]) / N
    torch.testing.assert_close(student_grad(reverse_kl, s, t, MASK), expected * MASK[..., None])


def test_jsd_bounds_limits_endpoints_symmetry():
    """§6 Distillation 2: JSD(0.5) in [0, log 2] (near log 2 for nearly disjoint distributions); JSD(beta) / beta ->
    KL(p || q) as beta -> 0 and JSD / (1 - beta) -> KL(q || p) as beta -> 1; beta = 0 / 1 are exactly forward_kl /
    reverse_kl; JSD(s, t, beta) = JSD(t, s, 1 - beta)."""
    s, t = logits(4), logits(5)
    for seed in range(5):
        value = jsd(logits(seed, 5.0), logits(seed + 50, 5.0), MASK)
        assert 0 < value < math.log(2)
    apart = torch.full((1, 1, 2), -40.0, dtype=torch.float64)
    a, b = apart.clone(), apart.clone()
    a[..., 0], b[..., 1] = 40.0, 40.0
    assert jsd(a, b, torch.ones(1, 1)).item() == pytest.approx(math.log(2), abs=1e-9)
    forward, reverse = forward_kl(s, t, MASK), reverse_kl(s, t, MASK)
    assert (jsd(s, t, MASK, 1e-6) / 1e-6).item() == pytest.approx(forward.item(), rel=1e-4)
    assert (jsd(s, t, MASK, 1 - 1e-6) / 1e-6).item() == pytest.approx(reverse.item(), rel=1e-4)
    assert jsd(s, t, MASK, 0.0) == forward and jsd(s, t, MASK, 1.0) == reverse
    for beta in [0.1, 0.5, 0.8]:
        torch.testing.assert_close(jsd(s, t, MASK, beta), jsd(t, s, MASK, 1 - beta))


def test_temperature():
    """Both distributions at temperature T, loss not rescaled: each loss at T equals the divergence of
    softmax(logits / T) (so T = 1 is the untempered divergence), and it vanishes as T -> infinity."""
    s, t = logits(6), logits(7)
    for temperature in [1.0, 0.7, 3.0]:
        log_q, log_p = (s / temperature).log_softmax(-1), (t / temperature).log_softmax(-1)
        torch.testing.assert_close(forward_kl(s, t, MASK, temperature), masked_mean(exact_kl(log_p, log_q)))
        torch.testing.assert_close(reverse_kl(s, t, MASK, temperature), masked_mean(exact_kl(log_q, log_p)))
        torch.testing.assert_close(jsd(s, t, MASK, 0.5, temperature), jsd(s / temperature, t / temperature, MASK))
    values = [forward_kl(s, t, MASK, temperature) for temperature in [1.0, 10.0, 1e4]]
    assert values[0] > values[1] > values[2] and values[2] < 1e-6


def test_topk_equals_full_kl_at_k_equal_v():
    """§6 Distillation 4: with k = V (empty tail) the top-k forward KL is the full one, in value and gradient, at
    any temperature."""
    s, t = logits(8), logits(9)
    for temperature in [1.0, 2.0]:
        torch.testing.assert_close(forward_kl(s, t, MASK, temperature, top_k=V), forward_kl(s, t, MASK, temperature))
        torch.testing.assert_close(student_grad(forward_kl, s, t, MASK, temperature, top_k=V),
                                   student_grad(forward_kl, s, t, MASK, temperature))


def test_topk_tail_bucket_is_a_lower_bound():
    """§4.4 / §6 Distillation 4: the (k + 1)-bucket KL lies in [0, full KL] (merging outcomes cannot increase a KL),
    grows with k, and is > 0 already at k = 1 thanks to the tail bucket."""
    s, t = logits(10), logits(11)
    full = forward_kl(s, t, MASK)
    values = [forward_kl(s, t, MASK, top_k=k) for k in range(1, V + 1)]
    assert values[0] > 0
    assert all(a <= b + 1e-12 for a, b in zip(values, values[1:])) and values[-2] <= full


def test_topk_gradient_closed_form():
    """d / d z_student = q - p~, p~ = the teacher's p on its top-k ids and its tail mass P_tail spread over the other
    ids in proportion to the student's q (q_v / Q_tail)."""
    s, t, k = logits(12), logits(13), 3
    ids, log_p = teacher_topk(t, k)
    q = s.softmax(-1)
    in_topk = torch.zeros(B, T, V, dtype=torch.bool).scatter(-1, ids, True)
    p_tail = 1 - log_p.exp().sum(-1, keepdim=True)
    q_tail = (q * ~in_topk).sum(-1, keepdim=True)
    p_tilde = torch.zeros(B, T, V, dtype=torch.float64).scatter(-1, ids, log_p.exp()) + ~in_topk * q / q_tail * p_tail
    expected = (q - p_tilde) / N * MASK[..., None]
    torch.testing.assert_close(student_grad(forward_kl, s, t, MASK, top_k=k), expected)


def test_stored_topk_form():
    """teacher_topk keeps the k most likely ids, largest first, with their log-probs at the temperature; the loss
    from the stored form is forward_kl(top_k=k)."""
    s, t = logits(14), logits(15)
    ids, log_p = teacher_topk(t, 4, temperature=2.0)
    full = (t / 2).log_softmax(-1)
    assert ids.shape == log_p.shape == (B, T, 4) and (log_p[..., 1:] <= log_p[..., :-1]).all()
    torch.testing.assert_close(log_p, full.gather(-1, ids))
    assert (full.topk(4, -1).values == log_p).all()
    torch.testing.assert_close(forward_kl_topk(s, ids, log_p, MASK, 2.0), forward_kl(s, t, MASK, 2.0, top_k=4))


def test_masked_tokens_contribute_nothing():
    """§6 Distillation 7: positions with mask 0 may hold anything (even inf / NaN): same losses, zero and finite
    gradient there; an all-zero mask gives 0."""
    s, t = logits(16), logits(17)
    s_bad, t_bad = s.clone(), t.clone()
    s_bad[MASK == 0], t_bad[MASK == 0] = math.nan, math.inf
    cases = [(forward_kl, {}), (forward_kl, {"top_k": 3}), (reverse_kl, {}), (jsd, {}), (jsd, {"beta": 0.3})]
    for loss, kw in cases:
        torch.testing.assert_close(loss(s_bad, t_bad, MASK, **kw), loss(s, t, MASK, **kw))
        g = student_grad(loss, s_bad, t_bad, MASK, **kw)
        assert torch.isfinite(g).all() and (g[MASK == 0] == 0).all()
        assert loss(s, t, torch.zeros(B, T), **kw) == 0


def test_teacher_is_a_fixed_target():
    """Teacher logits are detached: the loss sends no gradient to the teacher."""
    s, t = logits(18).requires_grad_(), logits(19).requires_grad_()
    for loss, kw in [(forward_kl, {}), (forward_kl, {"top_k": 3}), (reverse_kl, {}), (jsd, {})]:
        loss(s, t, MASK, **kw).backward()
        assert s.grad is not None and t.grad is None


def test_argument_checks():
    s, t = logits(20), logits(21)
    with pytest.raises(ValueError, match="top_k must be in \\[1, vocabulary size 7\\], got 8"):
        forward_kl(s, t, MASK, top_k=8)
    with pytest.raises(ValueError, match="top_k must be in \\[1, vocabulary size 7\\], got 0"):
        teacher_topk(t, 0)
    for loss in [forward_kl, reverse_kl, jsd]:
        for temperature in [0.0, -1.0]:
            with pytest.raises(ValueError, match=f"temperature must be > 0, got {temperature}"):
                loss(s, t, MASK, temperature=temperature)
    with pytest.raises(ValueError, match="beta must be in \\[0, 1\\], got 1.5"):
        jsd(s, t, MASK, beta=1.5)
