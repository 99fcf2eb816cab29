"""rl.py against the math of SAPO, GRPO and GSPO (shared/reference/post_training.md §1-3, properties of §6): autograd
gradients against closed forms, the gate's values and bounds, clipping, aggregation and padding, group advantages,
the logged diagnostics, argument checks; each verifiable reward on right, wrong and malformed replies; and the loop
on a tiny model: the policy's log-probs against the sampler's, a SAPO update that learns a preferred token, a run
with rewards, checkpoints and a bitwise resume, and bad settings stopping it before it writes anything."""
import math

import pytest
import torch

from rl import (REWARDS, check_rl_args, format_reward, group_advantages, grpo_loss, gspo_loss, k3_kl, last_boxed,
                loss_stats, reward_failures, safe_reward, sapo_gate, sapo_gate_weight, sapo_loss, sequence_ratio)

LENGTHS = [5, 3, 1]                 # response lengths of the test batch, right-padded to T = 5


def batch(seed=0, spread=0.3, lengths=LENGTHS, T=5):
    """old_logp, logp (requires grad), advantages [B], mask [B, T] float64; ratios exp(N(0, spread^2))."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    old = -3 * torch.rand(B, T, generator=g, dtype=torch.float64)
    logp = (old + spread * torch.randn(B, T, generator=g, dtype=torch.float64)).requires_grad_()
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).double()
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return old, logp, adv, mask


def grad(loss_fn, logp, *args, **kw):
    logp.grad = None
    loss_fn(logp, *args, **kw).backward()
    return logp.grad.clone()


def per_token_scale(mask):
    """1 / (B |y_i|) at response tokens, 0 at padding: the seq-mean-token-mean weight of each token."""
    return mask / mask.sum(-1, keepdim=True) / mask.shape[0]


def reinforce(logp, old_logp, adv, mask):
    adv = adv[:, None] if adv.dim() == 1 else adv
    return -(adv * logp * per_token_scale(mask)).sum()


# ---------------------------------------------------------------------------------------------------- SAPO


@pytest.mark.parametrize("per_token_adv", [False, True])
def test_on_policy_gradients_are_reinforce(per_token_adv):
    """§6 SAPO 1 / GRPO 1: at r = 1 SAPO (any taus), GRPO (any eps) and GSPO all give the REINFORCE gradient."""
    _, logp, adv, mask = batch()
    if per_token_adv:
        adv = torch.randn(mask.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    old = logp.detach()
    expected = grad(reinforce, logp, old, adv, mask)
    for taus in [(1.0, 1.05), (0.5, 3.0), (2.0, 2.0)]:
        torch.testing.assert_close(grad(sapo_loss, logp, old, adv, mask, *taus), expected)
    for eps in [0.2, (0.1, 0.5)]:
        torch.testing.assert_close(grad(grpo_loss, logp, old, adv, mask, eps), expected)
    torch.testing.assert_close(grad(gspo_loss, logp, old, adv, mask), expected)
    if not per_token_adv:                   # on-policy GRPO value: -mean(A) under seq-mean-token-mean
        torch.testing.assert_close(grpo_loss(logp, old, adv, mask), -adv.mean())


def test_sapo_gate_values():
    """§6 SAPO 2: f(1) = 2/tau, f'(1) = 1 for every tau, w = sech^2(tau (r-1)/2) = finite differences of f, the
    appendix's spot values."""
    for tau, f1 in [(0.1, 20.0), (1.0, 2.0), (1.05, 1.905), (5.0, 0.4)]:
        r = torch.ones((), dtype=torch.float64, requires_grad=True)
        f = sapo_gate(r, tau)
        f.backward()
        assert f.item() == pytest.approx(f1, abs=5e-4)
        assert r.grad.item() == 1.0
    r = torch.linspace(0, 6, 61, dtype=torch.float64)
    for tau in [0.7, 1.0, 1.05, 3.0]:
        h = 1e-6
        fd = (sapo_gate(r + h, tau) - sapo_gate(r - h, tau)) / (2 * h)
        torch.testing.assert_close(sapo_gate_weight(r, tau), fd, atol=1e-8, rtol=1e-6)
        torch.testing.assert_close(sapo_gate_weight(r, tau), torch.cosh(tau * (r - 1) / 2) ** -2)
    r = torch.tensor([0.5, 0.8, 1.2, 1.5, 2.0, 3.0, 5.0], dtype=torch.float64)
    torch.testing.assert_close(sapo_gate_weight(r, 1.0), torch.tensor(
        [0.940, 0.990, 0.990, 0.940, 0.786, 0.420, 0.071], dtype=torch.float64), atol=6e-4, rtol=0)
    torch.testing.assert_close(sapo_gate_weight(r, 1.05), torch.tensor(
        [0.934, 0.989, 0.989, 0.934, 0.768, 0.389, 0.058], dtype=torch.float64), atol=6e-4, rtol=0)


def test_sapo_gate_symmetric_decreasing_bounded():
    """§6 SAPO 3-4: w(1+d) = w(1-d), decreasing in |d|, in (0, 1], smaller for larger tau; 0 < f < 4/tau; w r peaks
    at 1.5747 (r = 2.06, tau = 1) and 1.5363 (r = 1.992, tau = 1.05); w = 0.5 / 0.9 at |tau (r-1)| = 1.7627 / 0.6549."""
    d = torch.linspace(0, 0.999, 1000, dtype=torch.float64)
    for tau in [1.0, 1.05, 4.0]:
        w = sapo_gate_weight(1 + d, tau)
        torch.testing.assert_close(w, sapo_gate_weight(1 - d, tau), rtol=0, atol=1e-15)
        assert (w[1:] < w[:-1]).all() and (w > 0).all() and (w <= 1).all()
        assert (sapo_gate_weight(1 + d[1:], tau + 0.5) < w[1:]).all()
    r = torch.linspace(0, 20, 20001, dtype=torch.float64)          # beyond, f rounds to 4/tau in float64
    for tau, peak, at in [(1.0, 1.5747, 2.060), (1.05, 1.5363, 1.992)]:
        f = sapo_gate(r, tau)
        assert (f > 0).all() and (f < 4 / tau).all()
        wr = sapo_gate_weight(r, tau) * r
        assert wr.max().item() == pytest.approx(peak, abs=1e-4)
        assert r[wr.argmax()].item() == pytest.approx(at, abs=2e-3)
    for tau in [1.0, 1.05]:
        assert sapo_gate_weight(torch.tensor(1 + 1.7627 / tau), tau).item() == pytest.approx(0.5, abs=1e-4)
        assert sapo_gate_weight(torch.tensor(1 + 0.6549 / tau), tau).item() == pytest.approx(0.9, abs=1e-4)


def test_sapo_gradient_closed_form():
    """Off-policy, [B, T] advantages of both signs and zeros: d loss / d logp = -w_tau(r) r A / (B |y_i|), tau by
    the sign of each token's advantage; a token with A = 0 gets no gradient."""
    old, logp, _, mask = batch(spread=0.8)
    adv = torch.randn(mask.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    adv[0, 1] = 0.0
    r = (logp - old).exp().detach()
    tau = torch.where(adv > 0, 1.0, 1.05)
    expected = -sapo_gate_weight(r, tau) * r * adv * per_token_scale(mask)
    got = grad(sapo_loss, logp, old, adv, mask)
    torch.testing.assert_close(got, expected)
    assert got[0, 1] == 0


def test_sapo_tau_follows_advantage_sign():
    """§6 SAPO 5: one token at r = 2: A = +1 uses tau_pos = 1 (weight 0.786), A = -1 uses tau_neg = 1.05 (0.768),
    A = 0 contributes neither loss nor gradient; with tau_pos = tau_neg the loss is odd in A, with the default
    (tau_neg > tau_pos) it is not."""
    old = torch.zeros(1, 1, dtype=torch.float64)
    mask = torch.ones(1, 1, dtype=torch.float64)
    logp = torch.full((1, 1), math.log(2.0), dtype=torch.float64, requires_grad=True)
    for a, coef in [(1.0, -0.786 * 2), (-1.0, 0.768 * 2)]:
        assert grad(sapo_loss, logp, old, torch.tensor([a]), mask).item() == pytest.approx(coef, abs=2e-3)
    zero = torch.zeros(1, dtype=torch.float64)
    assert sapo_loss(logp, old, zero, mask).item() == 0 and grad(sapo_loss, logp, old, zero, mask).item() == 0
    old, logp, adv, mask = batch(spread=0.8)
    torch.testing.assert_close(sapo_loss(logp, old, -adv, mask, 1.3, 1.3), -sapo_loss(logp, old, adv, mask, 1.3, 1.3))
    assert not torch.allclose(sapo_loss(logp, old, -adv, mask), -sapo_loss(logp, old, adv, mask))


def test_sapo_tau_limits():
    """§6 SAPO 6: tau = 1e-4 gives the unclipped importance-sampling gradient -r A / (B |y_i|) (to ~1e-4); tau = 1e4
    with r != 1 gives ~0."""
    old, logp, adv, mask = batch(spread=0.5)
    r = (logp - old).exp().detach()
    expected = -r * adv[:, None] * per_token_scale(mask)
    torch.testing.assert_close(grad(sapo_loss, logp, old, adv, mask, 1e-4, 1e-4), expected, rtol=2e-4, atol=0)
    assert ((r - 1).abs() > 1e-2).all()
    assert grad(sapo_loss, logp, old, adv, mask, 1e4, 1e4).abs().max() < 1e-30


def test_sapo_token_adaptive_where_gspo_drops_the_sequence():
    """§2.4 / §6 SAPO 8: ratios (1.02, 1.01, 0.99, 2.5), A = +1: SAPO weights ~(0.9999, 1.0, 1.0, 0.597), only the
    outlier damped; GSPO's s = 1.2637 is outside 1 + 4e-4, so every token gets zero gradient."""
    ratios = torch.tensor([[1.02, 1.01, 0.99, 2.5]], dtype=torch.float64)
    old, mask, adv = torch.zeros(1, 4, dtype=torch.float64), torch.ones(1, 4), torch.ones(1, dtype=torch.float64)
    logp = ratios.log().requires_grad_()
    weights = -grad(sapo_loss, logp, old, adv, mask) * 4 / ratios
    torch.testing.assert_close(weights, torch.tensor([[0.9999, 1.0, 1.0, 0.597]], dtype=torch.float64),
                               atol=5e-4, rtol=0)
    assert sequence_ratio(logp, old, mask).item() == pytest.approx(1.2637, abs=1e-4)
    assert (grad(gspo_loss, logp, old, adv, mask) == 0).all()


def test_sequence_gate_approximation():
    """§2.4 / §6 SAPO 9: with g(z) = sech^2(tau z / 2) the gate weight at r = 1 + z,
    |mean_t g(z_t) - g(mean z)| <= tau^2 / 4 Var(z) for small z."""
    g = torch.Generator().manual_seed(3)
    for tau in [1.0, 1.05, 3.0]:
        for _ in range(20):
            z = 0.1 * torch.randn(16, generator=g, dtype=torch.float64)
            gap = sapo_gate_weight(1 + z, tau).mean() - sapo_gate_weight(1 + z.mean(), tau)  # g(z) = w(1 + z)
            assert gap.abs() <= tau ** 2 / 4 * z.var(unbiased=False)


@pytest.mark.parametrize("loss", [sapo_loss, grpo_loss, gspo_loss])
def test_padding_and_length_normalisation(loss):
    """§6 SAPO 7: padding tokens (any values) change neither loss nor gradient; every response weighs the same
    whatever its length: repeating a response's tokens leaves the loss unchanged."""
    old, logp, adv, mask = batch(spread=0.1)
    padded_old = torch.cat([old, 5 * torch.randn(3, 4, dtype=torch.float64)], 1)
    padded_logp = torch.cat([logp.detach(), 7 * torch.randn(3, 4, dtype=torch.float64)], 1).requires_grad_()
    padded_mask = torch.cat([mask, torch.zeros(3, 4, dtype=torch.float64)], 1)
    torch.testing.assert_close(loss(padded_logp, padded_old, adv, padded_mask), loss(logp, old, adv, mask))
    g = grad(loss, padded_logp, padded_old, adv, padded_mask)
    torch.testing.assert_close(g[:, :5], grad(loss, logp, old, adv, mask))
    assert (g[padded_mask == 0] == 0).all()
    # response 1 (3 tokens) written twice over 6 tokens: same per-response mean, same loss
    widen = lambda x: torch.cat([x.detach(), torch.zeros(3, 1, dtype=x.dtype)], 1)
    old6, logp6, mask6 = widen(old), widen(logp), widen(mask)
    old6[1], logp6[1], mask6[1] = old[1, :3].repeat(2), logp.detach()[1, :3].repeat(2), 1
    torch.testing.assert_close(loss(logp6, old6, adv, mask6), loss(logp, old, adv, mask))


def test_aggregation_is_seq_mean_token_mean():
    """§6 GRPO 7: lengths 1 and 3, per-token losses l = -r A: loss = (l_1 + mean(l_2..4)) / 2, not sum(l) / 4."""
    r = torch.tensor([[1.1, 1.0, 1.0], [0.9, 1.05, 1.15]], dtype=torch.float64)
    adv, mask = torch.tensor([1.0, -2.0], dtype=torch.float64), torch.tensor([[1.0, 0, 0], [1, 1, 1]])
    l = -r * adv[:, None]
    expected = (l[0, 0] + l[1].mean()) / 2
    got = grpo_loss(r.log(), torch.zeros_like(r), adv, mask)
    torch.testing.assert_close(got, expected)
    assert not torch.isclose(got, (l * mask).sum() / 4)


@pytest.mark.parametrize("loss", [sapo_loss, grpo_loss, gspo_loss])
def test_extreme_log_ratios_stay_finite(loss):
    """§6 SAPO 10: logp - old_logp = +-50 or +-100, even in float32 (where exp(100) overflows), gives a finite loss
    and gradient: log-ratios are clamped to +-20."""
    for dtype, d in [(torch.float64, 50.0), (torch.float32, 100.0)]:
        logp = torch.tensor([[d, -d], [-d, d]], dtype=dtype, requires_grad=True)
        old, adv, mask = torch.zeros(2, 2, dtype=dtype), torch.tensor([1.0, -1.0], dtype=dtype), torch.ones(2, 2)
        value = loss(logp, old, adv, mask)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(logp.grad).all()
        assert torch.isfinite(k3_kl(logp, torch.zeros(2, 2, dtype=dtype))).all()
    # the ratio itself is capped at e^20: one token, A = -1, r = e^50 -> GRPO's loss is r = e^20
    one = torch.ones(1, 1, dtype=torch.float64)
    assert grpo_loss(50 * one, 0 * one, -one[0], one).item() == pytest.approx(math.exp(20))


# ---------------------------------------------------------------------------------------------------- GRPO


@pytest.mark.parametrize("adv, r, coef", [(1.0, 1.5, 0.0), (1.0, 0.5, -0.5), (-1.0, 0.5, 0.0), (-1.0, 1.5, 1.5)])
def test_grpo_one_sided_clip(adv, r, coef):
    """§6 GRPO 2 (eps = 0.2): the gradient is -A r (unclipped) unless the token already moved past the band in the
    direction A pushes it."""
    logp = torch.full((1, 1), math.log(r), dtype=torch.float64, requires_grad=True)
    g = grad(grpo_loss, logp, torch.zeros(1, 1), torch.tensor([adv]), torch.ones(1, 1))
    assert g.item() == pytest.approx(coef)


def test_grpo_asymmetric_band():
    """§6 GRPO 4: clip_eps = (0.2, 0.28) cuts at 1.28 for A > 0 and at 0.8 for A < 0."""
    r = torch.tensor([[1.27, 1.29], [0.81, 0.79]], dtype=torch.float64)
    logp = r.log().requires_grad_()
    g = grad(grpo_loss, logp, torch.zeros(2, 2), torch.tensor([1.0, -1.0]), torch.ones(2, 2), (0.2, 0.28))
    assert g[0, 0] != 0 and g[0, 1] == 0 and g[1, 0] != 0 and g[1, 1] == 0


def test_grpo_closed_form():
    """Inside the band GRPO equals its unclipped form -mean(r A); outside it the gradient is exactly 0; everywhere
    d loss / d logp = -r A 1[not clipped] / (B |y_i|)."""
    old, logp, adv, mask = batch(spread=0.05)
    r = (logp - old).exp().detach()
    assert ((r > 0.8) & (r < 1.2))[mask > 0].all()
    torch.testing.assert_close(grpo_loss(logp, old, adv, mask),
                               (-r * adv[:, None] * per_token_scale(mask)).sum())
    old, logp, adv, mask = batch(spread=0.4)
    r = (logp - old).exp().detach()
    a = adv[:, None]
    flat = ((a > 0) & (r > 1.2)) | ((a < 0) & (r < 0.8))
    assert flat[mask > 0].any() and (~flat)[mask > 0].any()
    torch.testing.assert_close(grad(grpo_loss, logp, old, adv, mask), -r * a * ~flat * per_token_scale(mask))


def test_k3_kl_term():
    """§6 GRPO 6: k3 = exp(d) - d - 1 >= 0, 0 at logp = ref_logp, ~d^2/2 for small d; grpo_loss adds
    kl_coef * its seq-mean-token-mean, with gradient kl_coef (1 - exp(ref - logp)) / (B |y_i|)."""
    old, logp, adv, mask = batch(spread=0.3)
    ref = old + 0.2 * torch.randn(old.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert (k3_kl(logp, ref) >= 0).all() and (k3_kl(logp, logp.detach()) == 0).all()
    d = torch.tensor([1e-3, -2e-3], dtype=torch.float64)
    torch.testing.assert_close(k3_kl(torch.zeros(2, dtype=torch.float64), d), d ** 2 / 2, rtol=2e-3, atol=0)
    base, with_kl = grpo_loss(logp, old, adv, mask), grpo_loss(logp, old, adv, mask, ref_logp=ref, kl_coef=0.04)
    expected = base + 0.04 * (k3_kl(logp, ref) * per_token_scale(mask)).sum()
    torch.testing.assert_close(with_kl, expected)
    kl_grad = grad(grpo_loss, logp, old, adv, mask, ref_logp=ref, kl_coef=0.04) - grad(grpo_loss, logp, old, adv, mask)
    torch.testing.assert_close(kl_grad, 0.04 * (1 - (ref - logp).exp().detach()) * per_token_scale(mask))
    with pytest.raises(ValueError, match="kl_coef = 0.1 needs ref_logp"):
        grpo_loss(logp, old, adv, mask, kl_coef=0.1)


# ---------------------------------------------------------------------------------------------------- GSPO


def test_gspo_sequence_ratio():
    """§6 GSPO 1, 5: s_i = the geometric mean of the token ratios (prod r^(1/|y_i|)), 1 on-policy, blind to padding
    and to repeating the response's log-ratios."""
    old, logp, _, mask = batch(spread=0.3)
    r = (logp - old).exp().detach()
    geometric = torch.stack([r[i, :n].prod() ** (1 / n) for i, n in enumerate(LENGTHS)])
    torch.testing.assert_close(sequence_ratio(logp, old, mask), geometric)
    assert (sequence_ratio(logp, logp.detach(), mask) == 1).all()
    torch.testing.assert_close(sequence_ratio(logp.repeat(1, 3), old.repeat(1, 3), torch.ones(3, 15))[0],
                               geometric[0])


@pytest.mark.parametrize("clip_eps", [(3e-4, 4e-4), 0.05])
def test_gspo_token_form_equals_sequence_form(clip_eps):
    """§6 GSPO 2: the loss (GSPO-token form) equals the sequence form -mean_i min(s_i A, clip(s_i) A), with gradient
    through s_i = exp(masked mean log r), in value and gradient."""
    old, logp, adv, mask = batch(spread=0.05)
    low, high = clip_eps if isinstance(clip_eps, tuple) else (clip_eps, clip_eps)

    def sequence_form(logp, old, adv, mask):
        s = (((logp - old) * mask).sum(-1) / mask.sum(-1)).exp()
        return torch.maximum(-s * adv, -s.clamp(1 - low, 1 + high) * adv).mean()

    torch.testing.assert_close(gspo_loss(logp, old, adv, mask, clip_eps), sequence_form(logp, old, adv, mask))
    torch.testing.assert_close(grad(gspo_loss, logp, old, adv, mask, clip_eps),
                               grad(sequence_form, logp, old, adv, mask))


def test_gspo_whole_sequence_clip_and_equal_token_weights():
    """§6 GSPO 3-4: a response with s > 1 + eps_high and A > 0 gets zero gradient on every token, the others are
    unaffected; inside the band every token of response i gets -A_i s_i / (B |y_i|)."""
    old, logp, _, mask = batch(spread=0.0)
    with torch.no_grad():
        logp[0] += 0.01                                 # s_0 = e^0.01, past 1 + 4e-4
        logp[1, :3] += torch.tensor([1e-4, -2e-4, 3e-4], dtype=torch.float64)
    adv = torch.tensor([1.0, 0.5, -2.0], dtype=torch.float64)
    g = grad(gspo_loss, logp, old, adv, mask)
    s = sequence_ratio(logp, old, mask).detach()
    assert (g[0] == 0).all()
    expected = -(adv * s)[:, None] * per_token_scale(mask)
    torch.testing.assert_close(g[1:], expected[1:])


# ---------------------------------------------------------------------------------------------------- advantages


def test_group_advantages():
    """§6 GRPO 5: zero mean and unit (unbiased) std in each group; a group of equal rewards, or of one response,
    gets exact zeros (no NaN); group_size must divide the number of rewards."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.3, 0.3, 0.3, 0.3, 0.2, 0.9, 0.4, 0.0])
    adv = group_advantages(rewards, 4).reshape(3, 4)
    torch.testing.assert_close(adv.mean(-1), torch.zeros(3), atol=1e-6, rtol=0)
    assert adv[1].eq(0).all()
    for row in adv[[0, 2]]:
        assert row.std().item() == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(adv[0], torch.tensor([1.0, -1.0, -1.0, 1.0]) * math.sqrt(3) / 2, atol=1e-5, rtol=0)
    one = group_advantages(torch.tensor([0.7, 0.1, 1.0]), 1)
    assert one.eq(0).all() and not one.isnan().any()
    assert group_advantages(torch.full((6,), 0.1, dtype=torch.float64), 3).eq(0).all()
    with pytest.raises(ValueError, match=r"group_size \(4\) must be >= 1 and divide the number of rewards \(6\)"):
        group_advantages(torch.zeros(6), 4)


# ---------------------------------------------------------------------------------------------------- diagnostics


def test_loss_stats():
    """By hand: response 0 (A = +1) has ratios 1, 1.5, 3, 2.7; response 1 (A = -1) has 0.7, 1, then padding.
    SAPO weight < 0.5: only r = 3 (0.420; r = 2.7 has 0.522); GRPO clips 1.5, 3 and 2.7 (A > 0, > 1.2) and 0.7
    (A < 0, < 0.8); GSPO: both sequence ratios (1.867, 0.837) are outside the band, so all 6 tokens."""
    r = torch.tensor([[1.0, 1.5, 3.0, 2.7], [0.7, 1.0, 9.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0]])
    stats = loss_stats(r.log(), torch.zeros_like(r), torch.tensor([1.0, -1.0]), mask)
    assert stats["sapo_gate_below_half"] == pytest.approx(1 / 6)
    assert stats["grpo_clip_fraction"] == pytest.approx(4 / 6)
    assert stats["gspo_clip_fraction"] == pytest.approx(1.0)
    assert stats["ratio_dev"] == pytest.approx((0 + 0.5 + 2 + 1.7 + 0.3 + 0) / 6)
    on_policy = loss_stats(r.log(), r.log(), torch.tensor([1.0, -1.0]), mask)
    assert on_policy == dict(ratio_dev=0.0, sapo_gate_below_half=0.0, grpo_clip_fraction=0.0, gspo_clip_fraction=0.0)


# ---------------------------------------------------------------------------------------------------- arguments


def test_argument_checks():
    check_rl_args(16)
    check_rl_args(2, 1.0, 1.0)
    check_rl_args(8, tau_pos=1.05, tau_neg=1.0, allow_inverted_tau=True)
    with pytest.raises(ValueError, match=r"tau_neg \(1.0\) < tau_pos \(1.05\).*allow_inverted_tau=True"):
        check_rl_args(8, tau_pos=1.05, tau_neg=1.0)
    with pytest.raises(ValueError, match="group_size must be >= 2.*got 1"):
        check_rl_args(1)
    with pytest.raises(ValueError, match="tau_pos must be > 0, got 0"):
        check_rl_args(8, tau_pos=0)
    old, logp, adv, mask = batch()
    with pytest.raises(ValueError, match="tau_neg must be > 0, got -1.0"):
        sapo_loss(logp, old, adv, mask, tau_neg=-1.0)
    with pytest.raises(ValueError, match=r"clip_eps must be .*got \(1.2, 0.2\)"):
        grpo_loss(logp, old, adv, mask, clip_eps=(1.2, 0.2))
    with pytest.raises(ValueError, match=r"advantages must be \[B\] or \[B, T\] with \[B, T\] = \[3, 5\], got \[4\]"):
        gspo_loss(logp, old, torch.zeros(4), mask)


# ---------------------------------------------------------------------------------------------------- rewards


def test_last_boxed():
    """§6 Rewards 1: nested braces, the last box wins, unclosed or missing -> None."""
    assert last_boxed(r"so \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{1} no, \boxed{2}") == "2"
    assert last_boxed(r"\boxed{\frac{1}{2}") is None and last_boxed("42") is None


THINK = "<think>\nlet me see\n</think>\n\n"
BOX = '{"bbox_2d": [100, 200, 300, 400], "label": "cup"}'
REWARD_CASES = [        # reward name, reply, answer, expected score
    ("exact", THINK + "The Red circle.", "red circle", 1.0),
    ("exact", r"\boxed{\frac{1}{2}}", r"\frac{1}{2}", 1.0),
    ("exact", THINK + "blue circle", "red circle", 0.0),
    ("exact", r"\boxed{\frac{1}{2}", r"\frac{1}{2}", 0.0),                      # unclosed box
    ("number", THINK + "There are 1,234 apples.", "1234", 1.0),
    ("number", "3 + 4 = 7.0", "7", 1.0),
    ("number", r"\boxed{-2.5}", "-2.5", 1.0),
    ("number", "8", "7", 0.0),
    ("number", THINK + "no idea", "7", 0.0),
    ("number", "no idea", "unknown", 0.0),                                       # no number on either side
    ("choice", THINK + "(B)", "B", 1.0),
    ("choice", "B. a cat", "B", 1.0),
    ("choice", "Answer: B", "(B)", 1.0),
    ("choice", r"\boxed{B}", "B", 1.0),
    ("choice", "C", "B", 0.0),
    ("choice", "A cat sits there", "A", 0.0),                                    # not a choice letter
    ("box_iou", THINK + "```json\n[" + BOX + "]\n```", [100, 200, 300, 400], 1.0),
    ("box_iou", "[100, 200, 300, 400]", BOX, 1.0),
    ("box_iou", "[100, 200, 200, 300]", BOX, 0.25),
    ("box_iou", "[400, 500, 600, 700]", BOX, 0.0),
    ("box_iou", "[300, 200, 100, 400]", BOX, 0.0),                               # x1 > x2
    ("box_iou", "[100, 200, 300]", BOX, 0.0),
    ("point", '{"point_2d": [150, 250]}', BOX, 1.0),
    ("point", "[300, 400]", [100, 200, 300, 400], 1.0),                         # on the corner
    ("point", "[301, 400]", [100, 200, 300, 400], 0.0),
    ("point", "the cup", BOX, 0.0),
    ("temporal_iou", "<1.0 seconds> to <3.5 seconds>", "from 1.0 to 3.5 seconds", 1.0),
    ("temporal_iou", THINK + "From 2 to 4.5 s.", "<1.0 seconds> to <3.5 seconds>", 1.5 / 3.5),
    ("temporal_iou", "1.0-3.5 seconds", "<5.0 seconds> to <6.0 seconds>", 0.0),
    ("temporal_iou", "at <2.0 seconds>", "<1.0 seconds> to <3.5 seconds>", 0.0),   # a time, not a span
    ("temporal_iou", "from 3.5 to 1.0 seconds", "<1.0 seconds> to <3.5 seconds>", 0.0),
    ("format", THINK + "42", None, 1.0),
    ("format", "<think></think>42", None, 1.0),
    ("format", "42", None, 0.0),
    ("format", THINK, None, 0.0),                                                # no answer
    ("format", "42 " + THINK + "42", None, 0.0),                                 # answer first
    ("format", THINK + THINK + "42", None, 0.0),
    ("format", "<think>a <think> b</think>42", None, 0.0),
]


@pytest.mark.parametrize("name, reply, answer, expected", REWARD_CASES)
def test_rewards(name, reply, answer, expected):
    """Each registered reward on right, wrong and malformed replies."""
    assert REWARDS[name](reply, answer) == pytest.approx(expected)


def test_every_reward_is_tested():
    assert {case[0] for case in REWARD_CASES} == set(REWARDS)


def test_box_iou_values():
    """§6 Rewards 2: a box inside one twice its size per side gives 0.25; IoU is the same in pixels and in the
    [0, 1000] frame (both boxes scaled alike)."""
    big, small = [0, 0, 400, 400], [100, 100, 300, 300]
    assert REWARDS["box_iou"](str(small), big) == 0.25
    a, b = [120, 80, 610, 500], [300, 250, 800, 900]
    pixels = lambda box: [v * s for v, s in zip(box, [1.28, 0.72, 1.28, 0.72])]
    assert REWARDS["box_iou"](str(a), b) == pytest.approx(REWARDS["box_iou"](str(pixels(a)), pixels(b)))
    assert 0 < REWARDS["box_iou"](str(a), b) < 1


def test_safe_reward():
    """A raising, NaN, None or out-of-range reward scores 0 and is counted; a valid score passes through."""
    def broken(reply, answer):
        raise KeyError(reply)

    reward_failures.clear()
    assert safe_reward(broken, "x", "y") == 0.0
    assert safe_reward(lambda r, a: float("nan"), "x", "y") == 0.0
    assert safe_reward(lambda r, a: 1.5, "x", "y") == 0.0
    assert safe_reward(lambda r, a: -0.1, "x", "y") == 0.0
    assert safe_reward(lambda r, a: None, "x", "y") == 0.0
    assert safe_reward(lambda r, a: 0.7, "x", "y") == 0.7
    assert safe_reward(format_reward, THINK + "1", None) == 1.0
    assert reward_failures == {"broken: raised": 1, "<lambda>: nan": 1, "<lambda>: out of range": 2,
                               "<lambda>: raised": 1}


# ---------------------------------------------------------------------------------------------------- the loop

import json
import os
from argparse import Namespace
from contextlib import nullcontext

import rl
from data import BadSample, Tasks
from data.jsonl import JsonlDataset
from data.toy import ToyData
from data.toyworld import ToyWorld
from model import Qwen3VL, Qwen3VLConfig
from processor import Processor
from tokenizer import Tokenizer

CPU = Namespace(device=torch.device("cpu"), autocast=nullcontext(), rank=0, world_size=1, distributed=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random toy-cpu model with a small BPE of the toy world, its processor, and its Hugging Face directory."""
    tok = Tokenizer.train(ToyWorld(seed=0).text_corpus(300), 400)
    cfg = Qwen3VLConfig.from_preset("toy-cpu", text=dict(vocab_size=448), image_token_id=tok.image_token_id,
                                    video_token_id=tok.video_token_id, vision_start_token_id=tok.vision_start_id,
                                    vision_end_token_id=tok.vision_end_id)
    model = Qwen3VL(cfg)
    model.init_weights(seed=1)
    processor = Processor(tok, min_pixels=96 * 96 // 2, max_pixels=96 * 96 * 4)
    path = tmp_path_factory.mktemp("tiny") / "hf"
    model.save_pretrained(path)
    tok.save(str(path / "tokenizer.tiktoken"))
    (path / "preprocessor_config.json").write_text(json.dumps(dict(min_pixels=96 * 96 // 2, max_pixels=96 * 96 * 4)))
    return model, tok, processor, str(path)


def toy_prompts(processor, tasks=("count", "text")):
    """One prompt of each task (count: an image; text: none, so shorter: the batch is left-padded)."""
    return [rl.encode_prompt(processor, Tasks(ToyData(seed=0), [t]).sample(0)) for t in tasks]


def test_response_masks():
    """A response ends at its first stop token, which belongs to it (mask) but is not fed back (keep); without one
    it runs to the end."""
    tokens = torch.tensor([[5, 9, 7, 9], [5, 6, 7, 8], [9, 1, 9, 1]])
    mask, keep = rl.response_masks(tokens, [9])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert keep.tolist() == [[True, False, False, False], [True] * 4, [False] * 4]


def test_policy_logprobs_equal_the_samplers(tiny, monkeypatch):
    """(a) The log-probs of one forward over prompt + sampled response equal generate's return_logprobs (fp32, to
    1e-5) on an image prompt and a shorter text one (left padding), with responses of different lengths (a quarter of
    the ids end a response), also when the rows are batched with less padding; the entropy is in (0, log V]."""
    model, tok, processor, _ = tiny
    monkeypatch.setattr(tok, "eos_ids", list(range(0, 448, 4)))
    args = Namespace(group_size=3, max_new_tokens=8, temperature=1.0)
    with torch.no_grad():
        ro = rl.rollout(model, processor, toy_prompts(processor), args, torch.Generator().manual_seed(0), CPU)
        lengths = ro.mask.sum(1)
        assert ro.stopped.any() and not ro.stopped.all() and len(set(lengths.tolist())) > 2
        logp, entropy = rl.policy_logprobs(model, rl.batch_inputs(ro.prompts, tok.pad_id, ro.responses, ro.keep),
                                           ro.responses)
        torch.testing.assert_close(logp * ro.mask, ro.old_logp, atol=1e-5, rtol=0)
        assert ((entropy > 0) & (entropy <= math.log(448) + 1e-4)).all()
        text_rows = slice(3, 6)                                    # the text prompt's group alone: no padding
        alone, _ = rl.policy_logprobs(model, rl.batch_inputs(ro.prompts[text_rows], tok.pad_id,
                                                             ro.responses[text_rows], ro.keep[text_rows]),
                                      ro.responses[text_rows])
        torch.testing.assert_close(alone * ro.mask[text_rows], ro.old_logp[text_rows], atol=1e-5, rtol=0)


def test_sapo_update_raises_the_rewarded_token(tiny):
    """(c) A group of four one-token responses to one prompt, two of token X (reward 1) and two of Y (reward 0):
    three SAPO updates (lr 1e-3, the behaviour log-probs recomputed by a forward: the first update of each call is
    exactly on-policy, ratio 1) multiply p(X) by more than 10 (measured: 0.002 -> 0.04) and divide p(Y) by more
    than 3, and the other tokens' probability falls."""
    model, tok, processor, _ = tiny
    policy = Qwen3VL(model.cfg)
    policy.load_state_dict(model.state_dict())
    prompt = toy_prompts(processor, ["text"])[0]
    X, Y = 100, 200
    tokens = torch.tensor([[X, tok.eos_ids[0]], [X, tok.eos_ids[0]], [Y, tok.eos_ids[0]], [Y, tok.eos_ids[0]]])
    ro = rl.make_rollouts([prompt] * 4, tokens, torch.zeros(4, 2), tok)

    def first_token_probs():
        with torch.no_grad():
            inputs = rl.batch_inputs([prompt], tok.pad_id, torch.tensor([[X]]), torch.tensor([[False]]))
            hidden, _ = policy(**inputs, return_hidden=True)
            return policy.lm_head(hidden[0, -2]).softmax(-1)              # p(first response token | prompt)

    before = first_token_probs()
    advantages = group_advantages(torch.tensor([1.0, 1.0, 0.0, 0.0]), 4)
    args = Namespace(algo="sapo", tau_pos=1.0, tau_neg=1.05, clip_eps=None, minibatches=1, ppo_epochs=1,
                     recompute_old_logp=True, grad_clip=1.0, lr=1e-3, vision_lr_mult=1.0, weight_decay=0.0,
                     beta2=0.999)
    optimizer = rl.train.make_optimizer(policy, args, "cpu")
    on_policy = rl.update(policy, optimizer, ro, advantages, Namespace(**{**vars(args), "ppo_epochs": 1}), CPU)
    assert on_policy["ratio_dev"] == 0 and on_policy["grad_norm"] > 0
    later = rl.update(policy, optimizer, ro, advantages, Namespace(**{**vars(args), "ppo_epochs": 2}), CPU)
    assert later["ratio_dev"] > 0 and later["loss"] < 0
    after = first_token_probs()
    assert after[X] > 10 * before[X] and after[Y] < before[Y] / 3
    assert after.sum() - after[X] - after[Y] < before.sum() - before[X] - before[Y]


def test_reward_of_a_sample():
    """A sample's named reward against its answer; else the dataset's scorer; a scorer that raises or gives NaN
    scores 0 and is counted under its task."""
    class Broken:
        def score(self, sample, reply):
            return float("nan") if reply == "nan" else 1 / 0
    data = ToyData(seed=0)
    s = Tasks(data, ["count"]).sample(0)
    assert rl.reward(data, s, s["answer"]) == 1.0 and rl.reward(data, s, "no idea") == 0.0
    assert rl.reward(data, dict(s, reward="number", answer="7"), "There are 7.") == 1.0
    reward_failures.clear()
    assert rl.reward(Broken(), s, "nan") == 0.0 and rl.reward(Broken(), s, "x") == 0.0
    assert reward_failures == {"count score: nan": 1, "count score: raised": 1}
    reward_failures.clear()


def test_jsonl_reward_field(tmp_path):
    path = tmp_path / "p.jsonl"
    line = {"messages": [{"role": "user", "content": "How many? Reply in \\boxed{}."}], "answer": "3",
            "reward": "number"}
    path.write_text(json.dumps(line) + "\n")
    s = JsonlDataset(str(path), require_assistant=False).sample(0)
    assert s["reward"] == "number" and rl.reward(None, s, "\\boxed{3}") == 1.0
    path.write_text(json.dumps(dict(line, reward="close enough")) + "\n")
    with pytest.raises(BadSample, match=r'p.jsonl:1: unknown "reward" \'close enough\'; known: \[\'box_iou\''):
        JsonlDataset(str(path), require_assistant=False)


def test_tasks_keep_some_tasks():
    data = Tasks(ToyData(seed=0), ["count", "think"])
    samples = [data.sample(i) for i in range(12)]
    assert {s["task"] for s in samples} == {"count", "think"}
    assert [s["question"] for s in samples] == [data.sample(i)["question"] for i in range(12)]
    assert {s["task"] for s in data.eval_samples(2)} == {"count", "think"} and set(data.chance) == {"count", "think"}
    with pytest.raises(ValueError, match=r"unknown \['cont'\]; known: \['attribute'"):
        Tasks(ToyData(seed=0), ["cont"])


RUN = ["--tasks", "count,text", "--prompts", "2", "--group_size", "2", "--minibatches", "2", "--ppo_epochs", "2",
       "--max_new_tokens", "6", "--eval_samples", "1", "--eval_every", "2", "--save_every", "2", "--lr", "1e-3"]


def without_times(metrics):
    return [{k: v for k, v in m.items() if k != "time"} for m in metrics]


def test_run_checkpoint_and_bitwise_resume(tiny, tmp_path, monkeypatch):
    """(b) Four steps end to end (rollout, reward, update, evaluation, checkpoints, export), against two steps and a
    resume for two more: bitwise the same metrics and weights. The reward is the length of the reply's text modulo
    3, over 2, so that the random model's groups differ and the updates move the weights."""
    monkeypatch.setattr(ToyData, "score", lambda self, sample, reply: len(reply) % 3 / 2)
    init = ["--init_from", tiny[3]]
    whole = rl.main(init + RUN + ["--steps", "4", "--out_dir", str(tmp_path / "a")])
    rl.main(init + RUN + ["--steps", "2", "--out_dir", str(tmp_path / "b")])
    assert sorted(os.listdir(tmp_path / "b" / "ckpt-0000002")) == [
        "config.json", "dcp", "preprocessor_config.json", "rng-0.safetensors", "tokenizer.tiktoken",
        "train_state.json", "video_preprocessor_config.json"]
    resumed = rl.main(init + RUN + ["--steps", "4", "--out_dir", str(tmp_path / "b"), "--resume"])
    assert without_times(resumed) == without_times(whole)
    with open(tmp_path / "b" / "metrics.jsonl") as f:
        assert without_times(map(json.loads, f)) == without_times(whole)
    steps = [m for m in whole if "reward" in m]
    assert [m["step"] for m in whole] == [0, 1, 2, 2, 3, 4, 4] and len(steps) == 4
    assert all(set(m["eval"]) == {"count", "text"} for m in whole if "eval" in m)
    assert all(set(m["reward_by_task"]) <= {"count", "text"} and 0 <= m["reward"] <= 1 for m in steps)
    assert all(1 <= m["response_length"] <= 6 and m["entropy"] > 0 and m["grad_norm"] > 0 for m in steps)
    assert all(m["reward_failures"] == {} and set(m["time"]) == {"rollout", "scoring", "update"} for m in steps)
    a, b = Qwen3VL.from_pretrained(tmp_path / "a" / "hf"), Qwen3VL.from_pretrained(tmp_path / "b" / "hf")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), tiny[0].state_dict().values()))
    assert os.path.isfile(tmp_path / "a" / "reward.png") and os.path.isfile(tmp_path / "a" / "metrics.png")


@pytest.mark.parametrize("flags, message", [
    (["--algo", "ppo"], "invalid choice: 'ppo'"),
    (["--tau_pos", "1.05", "--tau_neg", "1.0"], r"tau_neg \(1.0\) < tau_pos \(1.05\)"),
    (["--group_size", "1"], "group_size must be >= 2"),
    (["--prompts", "3", "--group_size", "3", "--minibatches", "2"], r"\(9 responses\) must divide into --minibatches 2"),
    (["--clip_eps", "0.2"], "--clip_eps is GRPO's and GSPO's: SAPO has no clip"),
    (["--algo", "grpo", "--clip_eps", "1.5,0.2"], r"clip_eps must be .*got \(1.5, 0.2\)"),
    (["--algo", "gspo", "--clip_eps", "a,b"], "--clip_eps 'a,b': give eps or eps_low,eps_high"),
    (["--lr", "0"], "--lr 0.0: must be a finite number >= 0 \\(> 0\\)"),
])
def test_bad_settings_exit_with_their_reason(flags, message, capsys):
    """(d) Each bad flag stops the run before anything is read or written, naming the flag and the rule."""
    with pytest.raises(SystemExit):
        rl.parse_args(["--init_from", "x"] + flags)
    assert re_search(message, capsys.readouterr().err)


def re_search(pattern, text):
    import re
    return re.search(pattern, text) is not None


def test_bad_inputs_stop_before_writing(tiny, tmp_path):
    """An inverted tau is allowed only with --allow_inverted_tau; an unknown task, a missing --init_from or an
    existing run stop main with an error before the output folder is written."""
    assert rl.parse_args(["--init_from", "x", "--tau_pos", "1.05", "--tau_neg", "1", "--allow_inverted_tau"])
    out = tmp_path / "o"
    with pytest.raises(ValueError, match=r"unknown \['cont'\]"):
        rl.main(["--init_from", tiny[3], "--tasks", "cont", "--out_dir", str(out)])
    with pytest.raises(ValueError, match="--init_from .*missing"):
        rl.main(["--init_from", str(tmp_path / "missing"), "--out_dir", str(out)])
    assert not out.exists()
    out.mkdir()
    (out / "latest").write_text("ckpt-0000001")
    with pytest.raises(FileExistsError, match="holds a run; --resume it"):
        rl.main(["--init_from", tiny[3], "--out_dir", str(out)])


FSDP_RUN = """
import sys
sys.path.insert(0, {root!r})
from data.toy import ToyData
import rl
ToyData.score = lambda self, sample, reply: len(reply) % 3 / 2
rl.main(sys.argv[1:])
"""


def test_fsdp_two_ranks_equal_one(tiny, tmp_path, monkeypatch):
    """torchrun with 2 CPU ranks (gloo, FSDP2; each rank samples every rollout and updates on half of each
    mini-batch) and 1 process: the same metrics and weights (the ranks sum gradients in another order, ~1e-9, which
    Adam can turn into ~lr on a weight whose gradient is that small: lr 1e-4, weights within 1e-5). Also
    guards the gradient norm under FSDP, which must read the parameters after the backward (read before it, the
    root's unsharded embedding held no gradient and the norm missed it)."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "run.py"
    script.write_text(FSDP_RUN.format(root=root))
    flags = ["--init_from", tiny[3], "--tasks", "count,text", "--prompts", "2", "--group_size", "2",
             "--minibatches", "1", "--ppo_epochs", "2", "--steps", "2", "--max_new_tokens", "6", "--eval_samples", "0",
             "--lr", "1e-4"]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), *flags,
                    "--out_dir", str(tmp_path / "two")], cwd=root, env=dict(os.environ, OMP_NUM_THREADS="1"),
                   check=True, capture_output=True)
    monkeypatch.setattr(ToyData, "score", lambda self, sample, reply: len(reply) % 3 / 2)
    one = rl.main(flags + ["--out_dir", str(tmp_path / "one")])
    two = [json.loads(line) for line in open(tmp_path / "two" / "metrics.jsonl")]
    assert len(two) == len(one) == 2 and all(m["grad_norm"] > 0 for m in one)
    for a, b in zip(two, one):
        for key, value in b.items():
            if isinstance(value, float):
                assert abs(a[key] - value) <= 1e-5 * max(1, abs(value)), key
    m2, m1 = Qwen3VL.from_pretrained(tmp_path / "two" / "hf"), Qwen3VL.from_pretrained(tmp_path / "one" / "hf")
    for (name, p), q in zip(m2.state_dict().items(), m1.state_dict().values()):
        assert (p - q).abs().max() <= 1e-5, name
