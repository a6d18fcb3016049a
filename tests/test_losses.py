"""Numerical tests for rayuid.sdpo.losses / rayuid.sdpo.logprobs (float64 on CPU unless testing dtypes)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rayuid.sdpo.losses import (
    SampledTokenOptions,
    distribution_loss,
    ema_update_,
    masked_sequence_mean,
    sampled_token_loss,
    token_logprobs,
    token_logprobs_from_logits,
)

F64 = torch.float64
KINDS = ("reverse_kl", "forward_kl", "jsd")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int, grad: bool = False, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=dtype).requires_grad_(grad)


def _ref_divergence(s_logits: torch.Tensor, t_logits: torch.Tensor, kind: str, alpha: float) -> torch.Tensor:
    """Independent full-vocab reference: (..., V) -> (...), written in probability space."""
    s, t = s_logits.log_softmax(-1), t_logits.detach().log_softmax(-1)
    if kind == "reverse_kl":
        return (s.exp() * (s - t)).sum(-1)
    if kind == "forward_kl":
        return (t.exp() * (t - s)).sum(-1)
    m = torch.log((1 - alpha) * s.exp() + alpha * t.exp())
    return (1 - alpha) * (s.exp() * (s - m)).sum(-1) + alpha * (t.exp() * (t - m)).sum(-1)


def _ref_sequence_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Python-loop reference of the per-sequence-then-batch mean."""
    rows = [per_token[b][mask[b].bool()].mean() for b in range(mask.shape[0]) if mask[b].any()]
    return torch.stack(rows).mean()


# 1. Lemma B.1: E_{y~pi}[grad(-A * log pi(y))] == grad KL(pi || stopgrad teacher), per position.

def _tiny_policy():
    """V=5, T=3 positions with fixed prefixes: student logits = feats @ theta.T."""
    feats, theta = _randn(3, 4, seed=1), _randn(5, 4, seed=2, grad=True)
    return feats, theta, _randn(3, 5, seed=3)


def test_expected_sampled_gradient_equals_reverse_kl_gradient_math() -> None:
    feats, theta, teacher_logits = _tiny_policy()
    s_lp, t_lp = (feats @ theta.T).log_softmax(-1), teacher_logits.log_softmax(-1)
    (grad_kl,) = torch.autograd.grad((s_lp.exp() * (s_lp - t_lp)).sum(), theta, retain_graph=True)
    expected = torch.zeros_like(theta)
    for t in range(3):
        for y in range(5):
            adv = (t_lp[t, y] - s_lp[t, y]).detach()
            (g,) = torch.autograd.grad(-adv * s_lp[t, y], theta, retain_graph=True)
            expected += s_lp[t, y].exp().detach() * g
    assert grad_kl.abs().max() > 1e-2  # non-trivial
    torch.testing.assert_close(expected, grad_kl, atol=1e-5, rtol=0)


def test_expected_sampled_gradient_through_library_equals_reverse_kl_gradient() -> None:
    feats, theta, teacher_logits = _tiny_policy()
    s_lp, t_lp = (feats @ theta.T).log_softmax(-1), teacher_logits.log_softmax(-1)
    kl = distribution_loss((feats @ theta.T)[None], teacher_logits[None], torch.ones(1, 3),
                           kind="reverse_kl")[0] * 3  # library mean over 3 positions -> sum
    (grad_kl,) = torch.autograd.grad(kl, theta)
    # One one-token "response" per (position, token); weighting each call's loss by the
    # detached student probability turns the sum into the expectation over y_t ~ pi.
    total = sum(s_lp[t, y].exp().detach()
                * sampled_token_loss(s_lp[t, y].view(1, 1), t_lp[t, y].view(1, 1), torch.ones(1, 1))[0]
                for t in range(3) for y in range(5))
    (grad_expected,) = torch.autograd.grad(total, theta)
    torch.testing.assert_close(grad_expected, grad_kl, atol=1e-5, rtol=0)


# 2. teacher == student -> loss 0, grads 0.

def test_sampled_token_loss_zero_when_teacher_equals_student() -> None:
    student = _randn(2, 6, seed=4, grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    for opts in (SampledTokenOptions(), SampledTokenOptions(ignore_first_k=1, center=True, adv_clip=0.5)):
        loss, stats = sampled_token_loss(student, student.detach().clone(), mask, opts)
        (grad,) = torch.autograd.grad(loss, student)
        assert loss.item() == 0.0 and grad.abs().max().item() == 0.0 and stats["adv_abs_mean"] == 0.0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("topk,add_tail", [(None, True), (3, True), (3, False)])
def test_distribution_loss_zero_when_teacher_equals_student(kind: str, topk: int | None, add_tail: bool) -> None:
    logits = _randn(2, 3, 7, seed=5, grad=True)
    loss, _ = distribution_loss(logits, logits.detach().clone(), torch.ones(2, 3), kind=kind,
                                alpha=0.3, topk=topk, add_tail=add_tail, chunk_size=2)
    (grad,) = torch.autograd.grad(loss, logits)
    assert abs(loss.item()) < 1e-12 and grad.abs().max().item() < 1e-12


# 3. topk == V reproduces the full-vocabulary loss.

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("add_tail", [True, False])
def test_topk_equal_vocab_matches_full(kind: str, add_tail: bool) -> None:
    s, t, mask = _randn(2, 4, 6, seed=6, grad=True), _randn(2, 4, 6, seed=7), torch.ones(2, 4)
    full, _ = distribution_loss(s, t, mask, kind=kind, alpha=0.4)
    (g_full,) = torch.autograd.grad(full, s)
    top, _ = distribution_loss(s, t, mask, kind=kind, alpha=0.4, topk=6, add_tail=add_tail)
    (g_top,) = torch.autograd.grad(top, s)
    torch.testing.assert_close(top, full, atol=1e-6, rtol=0)
    torch.testing.assert_close(g_top, g_full, atol=1e-6, rtol=0)


def test_topk_tail_bucket_value() -> None:
    """With k < V and a tail, the loss is the KL between (k+1)-bucket distributions."""
    s, t = _randn(1, 1, 6, seed=8), _randn(1, 1, 6, seed=9)
    ps, pt = s.softmax(-1)[0, 0], t.softmax(-1)[0, 0]
    ids = ps.topk(2).indices
    bs = torch.cat([ps[ids], 1 - ps[ids].sum(0, keepdim=True)])
    bt = torch.cat([pt[ids], 1 - pt[ids].sum(0, keepdim=True)])
    loss, stats = distribution_loss(s, t, torch.ones(1, 1), kind="reverse_kl", topk=2)
    torch.testing.assert_close(loss, (bs * (bs / bt).log()).sum(), atol=1e-12, rtol=0)
    assert stats["student_topk_mass"] == pytest.approx(ps[ids].sum().item())


# 4. chunked == unchunked.

@pytest.mark.parametrize("chunk_size", [1, 3, 7, 10])
def test_token_logprobs_chunked_matches_naive(chunk_size: int) -> None:
    hidden, weight = _randn(2, 5, 4, seed=10, grad=True), _randn(11, 4, seed=11, grad=True)
    bias = _randn(11, seed=12, grad=True)
    targets = torch.randint(0, 11, (2, 5), generator=_gen(13))
    upstream = _randn(2, 5, seed=14)
    naive = (hidden @ weight.T + bias).log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    ref_grads = torch.autograd.grad((naive * upstream).sum(), (hidden, weight, bias))
    out = token_logprobs(hidden, weight, targets, chunk_size=chunk_size, bias=bias)
    grads = torch.autograd.grad((out * upstream).sum(), (hidden, weight, bias))
    assert out.shape == (2, 5) and out.dtype == F64
    torch.testing.assert_close(out, naive, atol=1e-6, rtol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=0)
    from_logits = token_logprobs_from_logits(hidden @ weight.T + bias, targets, chunk_size=chunk_size)
    torch.testing.assert_close(from_logits, naive, atol=1e-6, rtol=0)
    g_from = torch.autograd.grad((from_logits * upstream).sum(), (hidden, weight, bias))
    for g, r in zip(g_from, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=0)


def test_token_logprobs_gradcheck_and_no_bias() -> None:
    hidden, weight = _randn(5, 3, seed=15, grad=True), _randn(6, 3, seed=16, grad=True)
    targets = torch.randint(0, 6, (5,), generator=_gen(17))
    assert torch.autograd.gradcheck(lambda h, w: token_logprobs(h, w, targets, chunk_size=2), (hidden, weight))
    with torch.no_grad():
        out = token_logprobs(hidden, weight, targets, chunk_size=2)
    assert not out.requires_grad


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("topk", [None, 4])
def test_distribution_loss_chunked_matches_unchunked(kind: str, topk: int | None) -> None:
    s, t = _randn(2, 5, 9, seed=18, grad=True), _randn(2, 5, 9, seed=19)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
    ref, _ = distribution_loss(s, t, mask, kind=kind, topk=topk, chunk_size=10)
    (g_ref,) = torch.autograd.grad(ref, s)
    if topk is None:  # also against the independent probability-space reference
        torch.testing.assert_close(ref, _ref_sequence_mean(_ref_divergence(s, t, kind, 0.5), mask), atol=1e-12, rtol=0)
    for chunk_size in (1, 3, 7):
        out, _ = distribution_loss(s, t, mask, kind=kind, topk=topk, chunk_size=chunk_size)
        (g,) = torch.autograd.grad(out, s)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=0)


# 5. Padding and fully-masked sequences never change results.

def _pad(x: torch.Tensor, left: int, right: int, rows: int, fill: float) -> torch.Tensor:
    """(B, T, ...) -> (B + rows, left + T + right, ...) filled with `fill` outside the original."""
    out = torch.full((x.shape[0] + rows, left + x.shape[1] + right, *x.shape[2:]), fill, dtype=x.dtype)
    out[: x.shape[0], left: left + x.shape[1]] = x
    return out


def test_sampled_token_loss_padding_invariant() -> None:
    opts = SampledTokenOptions(ignore_first_k=1, center=True, adv_clip=0.7, ratio_clip=0.2)
    s, t, old = _randn(2, 4, seed=20, grad=True), _randn(2, 4, seed=21), _randn(2, 4, seed=22) * 0.1
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    old = s.detach() + old
    loss, stats = sampled_token_loss(s, t, mask, opts, old_lp=old)
    (grad,) = torch.autograd.grad(loss, s)
    s_pad = _pad(s.detach(), 2, 3, 1, 1e30).requires_grad_()
    loss_pad, stats_pad = sampled_token_loss(s_pad, _pad(t, 2, 3, 1, -1e30), _pad(mask, 2, 3, 1, 0),
                                             opts, old_lp=_pad(old, 2, 3, 1, -1e30))
    (grad_pad,) = torch.autograd.grad(loss_pad, s_pad)
    # identical up to summation order (rows are longer), hence 1e-12 rather than ==
    torch.testing.assert_close(loss_pad, loss, atol=1e-12, rtol=0)
    assert stats_pad == pytest.approx(stats, abs=1e-12)
    torch.testing.assert_close(grad_pad[:2, 2:6], grad, atol=1e-12, rtol=0)
    grad_pad[:2, 2:6] = 0
    assert grad_pad.abs().max().item() == 0.0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("topk", [None, 3])
def test_distribution_loss_padding_invariant(kind: str, topk: int | None) -> None:
    s, t, mask = _randn(2, 3, 6, seed=23, grad=True), _randn(2, 3, 6, seed=24), torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, _ = distribution_loss(s, t, mask, kind=kind, topk=topk, chunk_size=2)
    (grad,) = torch.autograd.grad(loss, s)
    s_pad = _pad(s.detach(), 1, 2, 1, 1e30)
    s_pad[:, :, 0] = -1e30  # garbage with huge spread, still NaN-free
    s_pad[:2, 1:4] = s.detach()
    s_pad.requires_grad_()
    loss_pad, _ = distribution_loss(s_pad, _pad(t, 1, 2, 1, -1e30), _pad(mask, 1, 2, 1, 0),
                                    kind=kind, topk=topk, chunk_size=2)
    (grad_pad,) = torch.autograd.grad(loss_pad, s_pad)
    torch.testing.assert_close(loss_pad, loss, atol=1e-12, rtol=0)
    torch.testing.assert_close(grad_pad[:2, 1:4], grad, atol=1e-12, rtol=0)
    grad_pad[:2, 1:4] = 0
    assert grad_pad.abs().max().item() == 0.0


def test_masked_sequence_mean_edge_cases() -> None:
    x = torch.tensor([[1.0, 2.0, float("nan")], [5.0, float("inf"), 0.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert masked_sequence_mean(x, mask).item() == 1.5
    assert masked_sequence_mean(x, torch.zeros(2, 3)).item() == 0.0


# 6. Hand-computed KL values, JSD symmetry and alpha limits.

def _two_position_example() -> tuple[torch.Tensor, torch.Tensor]:
    """Position 0: p = (.25, .75), q = (.5, .5). Position 1: p = (.5, .5), q = (.9, .1)."""
    p = torch.tensor([[[0.25, 0.75], [0.5, 0.5]]], dtype=F64)
    q = torch.tensor([[[0.5, 0.5], [0.9, 0.1]]], dtype=F64)
    return p.log(), q.log()


def test_kl_values_hand_computed() -> None:
    s, t = _two_position_example()
    mask = torch.ones(1, 2)
    # reverse: KL0 = .25 ln .5 + .75 ln 1.5 = 0.130812036; KL1 = .5 ln(.5/.9) + .5 ln 5 = 0.510825624
    reverse, _ = distribution_loss(s, t, mask, kind="reverse_kl")
    assert reverse.item() == pytest.approx((0.130812036 + 0.510825624) / 2, abs=1e-8)
    # forward: KL0 = .5 ln 2 + .5 ln(2/3) = 0.143841036; KL1 = .9 ln 1.8 + .1 ln .2 = 0.368064207
    forward, _ = distribution_loss(s, t, mask, kind="forward_kl")
    assert forward.item() == pytest.approx((0.143841036 + 0.368064207) / 2, abs=1e-8)


def test_jsd_symmetry_and_alpha_limits() -> None:
    s, t = _randn(2, 3, 5, seed=25, grad=True), _randn(2, 3, 5, seed=26)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])

    def jsd(a: torch.Tensor, b: torch.Tensor, alpha: float) -> float:
        return distribution_loss(a, b, mask, kind="jsd", alpha=alpha)[0].item()

    assert jsd(s, t, 0.5) == pytest.approx(jsd(t, s, 0.5), abs=1e-12)
    assert jsd(s, t, 0.2) == pytest.approx(jsd(t, s, 0.8), abs=1e-12)
    for alpha in (0.0, 1.0):  # documented: unnormalised JSD vanishes at both ends
        loss, _ = distribution_loss(s, t, mask, kind="jsd", alpha=alpha)
        (g,) = torch.autograd.grad(loss, s)
        assert loss.item() == 0.0 and g.abs().max().item() < 1e-12
    fwd = distribution_loss(s, t, mask, kind="forward_kl")[0].item()
    rev = distribution_loss(s, t, mask, kind="reverse_kl")[0].item()
    eps = 1e-5
    assert jsd(s, t, eps) / eps == pytest.approx(fwd, rel=1e-3)
    assert jsd(s, t, 1 - eps) / eps == pytest.approx(rev, rel=1e-3)


def test_distribution_loss_rejects_bad_arguments() -> None:
    s = torch.zeros(1, 1, 3)
    with pytest.raises(ValueError, match="reverse_kl, forward_kl, jsd"):
        distribution_loss(s, s, torch.ones(1, 1), kind="kl")
    with pytest.raises(ValueError, match="topk"):
        distribution_loss(s, s, torch.ones(1, 1), topk=4)
    with pytest.raises(ValueError, match="alpha"):
        distribution_loss(s, s, torch.ones(1, 1), kind="jsd", alpha=1.5)


# 7. Options.

def _used_advantage(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, opts: SampledTokenOptions) -> torch.Tensor:
    """Recover the advantage from the gradient: d loss / d lp_i = -A_i / (n_seq * B_eff)."""
    s = s.detach().requires_grad_()
    loss, _ = sampled_token_loss(s, t, mask, opts)
    (grad,) = torch.autograd.grad(loss, s)
    return -grad


def test_ignore_first_k_drops_first_valid_tokens() -> None:
    s, t = _randn(2, 5, seed=27, grad=True), _randn(2, 5, seed=28)
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 0, 0, 0]])  # row 0 left-padded, row 1 has only 2
    loss, stats = sampled_token_loss(s, t, mask, SampledTokenOptions(ignore_first_k=2))
    kept = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 0, 0]])
    manual = _ref_sequence_mean(-(t - s.detach()) * s, kept)
    torch.testing.assert_close(loss, manual, atol=1e-12, rtol=0)
    (grad,) = torch.autograd.grad(loss, s)
    assert stats["tokens"] == 2 and (grad[kept == 0] == 0).all() and (grad[kept == 1] != 0).all()


def test_center_and_adv_clip() -> None:
    s, t = _randn(2, 5, seed=29), _randn(2, 5, seed=30) * 3
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    counts = torch.tensor([[4.0], [5.0]], dtype=F64)
    raw = (t - s) * mask
    centred = _used_advantage(s, t, mask, SampledTokenOptions(center=True)) * counts * 2
    torch.testing.assert_close(centred.sum(-1), torch.zeros(2, dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(centred, (raw - raw.sum(-1, keepdim=True) / counts) * mask, atol=1e-12, rtol=0)
    clipped = _used_advantage(s, t, mask, SampledTokenOptions(adv_clip=0.5)) * counts * 2
    assert clipped.abs().max().item() <= 0.5 + 1e-12 and (raw.abs() > 0.5).any()
    torch.testing.assert_close(clipped, raw.clamp(-0.5, 0.5), atol=1e-12, rtol=0)


def test_ratio_clip_matches_unclipped_on_policy() -> None:
    s, t, mask = _randn(2, 4, seed=31, grad=True), _randn(2, 4, seed=32), torch.ones(2, 4)
    (g_plain,) = torch.autograd.grad(sampled_token_loss(s, t, mask)[0], s)
    loss, stats = sampled_token_loss(s, t, mask, SampledTokenOptions(ratio_clip=0.2), old_lp=s.detach())
    (g_clip,) = torch.autograd.grad(loss, s)
    torch.testing.assert_close(g_clip, g_plain, atol=1e-12, rtol=0)
    assert stats["clip_frac"] == 0.0
    with pytest.raises(ValueError, match="old_lp"):
        sampled_token_loss(s, t, mask, SampledTokenOptions(ratio_clip=0.2))


def test_ratio_clip_hand_case() -> None:
    # token:            A>0,r>1+e   A<0,r<1-e   A>0,r<1-e   A<0,r>1+e   A>0,r in band
    s = torch.tensor([[-1.0, -1.0, -1.0, -1.0, -1.0]], dtype=F64, requires_grad=True)
    log_r = torch.tensor([[0.5, -0.5, -0.5, 0.5, 0.05]], dtype=F64)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0, 2.0]], dtype=F64)
    loss, stats = sampled_token_loss(s, s.detach() + adv, torch.ones(1, 5), SampledTokenOptions(ratio_clip=0.2),
                                     old_lp=s.detach() - log_r)
    (grad,) = torch.autograd.grad(loss, s)
    expected = -adv * log_r.exp() / 5  # d(-r A)/d lp = -r A, token mean over 5
    expected[0, :2] = 0.0  # clipped side: the surrogate is constant there
    torch.testing.assert_close(grad, expected, atol=1e-12, rtol=0)
    assert stats["clip_frac"] == pytest.approx(0.4)


# 8. Stats.

def test_stats_adv_eos_is_last_valid_token() -> None:
    s, t = _randn(3, 5, seed=33), _randn(3, 5, seed=34)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    _, stats = sampled_token_loss(s, t, mask)
    adv = t - s
    assert stats["adv_eos_mean"] == pytest.approx(((adv[0, 2] + adv[1, 4]) / 2).item(), abs=1e-12)
    valid = adv[mask.bool()]
    assert stats["tokens"] == 7
    assert stats["adv_mean"] == pytest.approx(valid.mean().item(), abs=1e-12)
    assert stats["adv_std"] == pytest.approx(valid.std(unbiased=False).item(), abs=1e-12)
    assert stats["adv_abs_mean"] == pytest.approx(valid.abs().mean().item(), abs=1e-12)


# 9. bf16 inputs.

def test_token_logprobs_bf16_returns_float32_close_to_fp32() -> None:
    hidden = _randn(3, 20, 16, seed=35, dtype=torch.float32).bfloat16().requires_grad_()
    weight = (_randn(50, 16, seed=36, dtype=torch.float32) * 0.3).bfloat16().requires_grad_()
    targets = torch.randint(0, 50, (3, 20), generator=_gen(37))
    out = token_logprobs(hidden, weight, targets, chunk_size=7)
    ref = F.log_softmax(hidden.float() @ weight.float().T, -1).gather(-1, targets[..., None]).squeeze(-1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=5e-2, rtol=0)
    out.sum().backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    token_logprobs(h32, w32, targets).sum().backward()
    torch.testing.assert_close(weight.grad.float(), w32.grad, atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(hidden.grad.float(), h32.grad, atol=5e-2, rtol=2e-2)


def test_ema_update() -> None:
    target, source = [torch.ones(3), torch.zeros(2)], [torch.zeros(3), torch.ones(2)]
    ema_update_(target, source, 0.25)
    assert torch.equal(target[0], torch.full((3,), 0.75)) and torch.equal(target[1], torch.full((2,), 0.25))
    with pytest.raises(ValueError):
        ema_update_([torch.ones(3)], [torch.ones(1)], 0.5)
    with pytest.raises(ValueError):
        ema_update_([torch.ones(3)], [torch.ones(3)], 1.5)


def test_hand_values_are_consistent_with_math() -> None:
    """Guard the literal constants used in test_kl_values_hand_computed."""
    assert 0.25 * math.log(0.5) + 0.75 * math.log(1.5) == pytest.approx(0.130812036, abs=1e-9)
    assert 0.9 * math.log(1.8) + 0.1 * math.log(0.2) == pytest.approx(0.368064207, abs=1e-9)
