"""Each offline objective against an independent float64 formula (plain math, no torch.nn.functional),
gradient checks, extreme log-ratios and hand-derived values."""
import math

import pytest
import torch

from distalign import objectives as O



pytestmark = pytest.mark.usefixtures("float64_default")


def log1pexp(x):
    """log(1 + e^x), stable, elementwise in plain Python."""
    return torch.tensor([v + math.log1p(math.exp(-v)) if v > 0 else math.log1p(math.exp(v)) for v in x.tolist()])


def neg_logsig(x):
    return log1pexp(-x)


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    s = lambda: -torch.rand(16, generator=g) * 40  # summed log-probs of 16 pairs
    lengths = lambda: torch.randint(1, 30, (16,), generator=g).double()
    return dict(pc=s(), pr=s(), rc=s(), rr=s(), lc=lengths(), lr=lengths())


def margin(p):
    return (p["pc"] - p["rc"]) - (p["pr"] - p["rr"])


def test_dpo_matches_formula(pair):
    got = O.dpo_loss(pair["pc"], pair["pr"], pair["rc"], pair["rr"], beta=0.3)
    torch.testing.assert_close(got, neg_logsig(0.3 * margin(pair)), atol=1e-6, rtol=0)


def test_dpo_zero_margin_is_log2():
    z = torch.zeros(3)
    torch.testing.assert_close(O.dpo_loss(z, z, z, z, beta=0.1), torch.full((3,), math.log(2)))


def test_ipo_hinge_match_formula(pair):
    h = margin(pair)
    args = (pair["pc"], pair["pr"], pair["rc"], pair["rr"], pair["lc"], pair["lr"])
    per_token = (pair["pc"] - pair["rc"]) / pair["lc"] - (pair["pr"] - pair["rr"]) / pair["lr"]
    torch.testing.assert_close(O.ipo_loss(*args, beta=0.5), (per_token - 1.0) ** 2, atol=1e-6, rtol=0)
    torch.testing.assert_close(O.ipo_loss(*args, beta=0.5, per_token=False), (h - 1.0) ** 2, atol=1e-6, rtol=0)
    expected = torch.tensor([max(0.0, 1 - 0.2 * v) for v in h.tolist()])
    torch.testing.assert_close(O.hinge_loss(pair["pc"], pair["pr"], pair["rc"], pair["rr"], beta=0.2),
                               expected, atol=1e-6, rtol=0)


def test_robust_dpo_variants(pair):
    b, e = 0.1, 0.2
    h = margin(pair)
    cons = (1 - e) * neg_logsig(b * h) + e * neg_logsig(-b * h)
    rob = ((1 - e) * neg_logsig(b * h) - e * neg_logsig(-b * h)) / (1 - 2 * e)
    args = (pair["pc"], pair["pr"], pair["rc"], pair["rr"])
    torch.testing.assert_close(O.robust_dpo_loss(*args, beta=b, epsilon=e), cons, atol=1e-6, rtol=0)
    torch.testing.assert_close(O.robust_dpo_loss(*args, beta=b, epsilon=e, variant="robust"), rob,
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(O.robust_dpo_loss(*args, beta=b, epsilon=0.0), O.dpo_loss(*args, beta=b))
    with pytest.raises(ValueError, match="epsilon"):
        O.robust_dpo_loss(*args, epsilon=0.5)


def test_robust_dpo_is_unbiased_under_flips():
    """E over a flip with rate eps of rDPO(flipped label) equals the clean DPO loss (Chowdhury et al.)."""
    h, e = torch.tensor([0.7, -2.0, 5.0]), 0.3
    z = torch.zeros(3)
    clean = O.dpo_loss(h, z, z, z, beta=1.0)
    expected = (1 - e) * O.robust_dpo_loss(h, z, z, z, beta=1.0, epsilon=e, variant="robust") \
        + e * O.robust_dpo_loss(-h, z, z, z, beta=1.0, epsilon=e, variant="robust")
    torch.testing.assert_close(expected, clean)


def test_simpo_rpo_pmle_match_formula(pair):
    d = pair["pc"] / pair["lc"] - pair["pr"] / pair["lr"]
    torch.testing.assert_close(O.simpo_loss(pair["pc"], pair["pr"], pair["lc"], pair["lr"], beta=2.0, margin=0.5),
                               neg_logsig(2.0 * d - 0.5), atol=1e-6, rtol=0)
    rpo = neg_logsig(0.1 * margin(pair)) - 0.7 * pair["pc"] / pair["lc"]
    torch.testing.assert_close(O.rpo_loss(pair["pc"], pair["pr"], pair["rc"], pair["rr"], pair["lc"],
                                          beta=0.1, alpha=0.7, nll="example"), rpo, atol=1e-6, rtol=0)
    batch_nll = -pair["pc"].sum() / pair["lc"].sum()
    got = O.rpo_loss(pair["pc"], pair["pr"], pair["rc"], pair["rr"], pair["lc"], beta=0.1, alpha=0.7)
    torch.testing.assert_close(got.mean(), neg_logsig(0.1 * margin(pair)).mean() + 0.7 * batch_nll,
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(O.pmle_loss(pair["pc"], pair["pr"], gamma=1.5),
                               neg_logsig(1.5 * (pair["pc"] - pair["pr"])), atol=1e-6, rtol=0)


def test_cpo_variants_match_formula(pair):
    b, a, tau, g = 0.5, 2.0, 5.0, 0.3
    dp = pair["pc"] / pair["lc"] - pair["pr"] / pair["lr"]
    dr = pair["rc"] / pair["lc"] - pair["rr"] / pair["lr"]
    soft = log1pexp(tau * (g - dr)) / tau
    args = (pair["pc"], pair["pr"], pair["rc"], pair["rr"], pair["lc"], pair["lr"])
    torch.testing.assert_close(O.cpo_loss(*args, beta=b, alpha=a, tau=tau, margin=g),
                               neg_logsig(b * dp - b * dr - (b / a) * soft), atol=1e-6, rtol=0)
    bounded = lambda s, n: 1 / (1 + (s / n).abs())
    simple = neg_logsig(b * dp - g * (bounded(pair["rc"], pair["lc"]) + bounded(pair["rr"], pair["lr"])))
    torch.testing.assert_close(O.cpo_loss(*args, beta=b, margin=g, variant="simple"), simple, atol=1e-6, rtol=0)
    clip = neg_logsig(b * (dp - dr.clamp(min=0)))
    torch.testing.assert_close(O.cpo_loss(*args, beta=b, variant="clip"), clip, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="variant"):
        O.cpo_loss(*args, variant="nope")


def test_cpo_full_reduces_to_dpo_when_reference_agrees():
    """If the reference prefers chosen by far more than g, softplus_tau(g - d_ref) ~ 0: CPO = DPO (normalised)."""
    ones = torch.ones(2)
    pc, pr, rc, rr = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0]), torch.tensor([-1.0, -1.0]), \
        torch.tensor([-60.0, -80.0])
    cpo = O.cpo_loss(pc, pr, rc, rr, ones, ones, beta=0.1, tau=10.0, margin=0.0)
    torch.testing.assert_close(cpo, O.dpo_loss(pc, pr, rc, rr, beta=0.1), atol=1e-12, rtol=0)


def test_sft_reward_distill_match_formula():
    g = torch.Generator().manual_seed(1)
    tok = -torch.rand(4, 6, generator=g) * 5
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [1] * 6, [0] * 6, [0, 0, 0, 0, 0, 1]])
    expected = torch.tensor([-(tok[i] * mask[i]).sum().item() / max(1, mask[i].sum().item()) for i in range(4)])
    torch.testing.assert_close(O.sft_loss(tok, mask), expected)
    rc, rr = torch.randn(5, generator=g) * 3, torch.randn(5, generator=g) * 3
    torch.testing.assert_close(O.reward_bt_loss(rc, rr, margin=0.5, l2=0.01),
                               neg_logsig(rc - rr - 0.5) + 0.01 * (rc ** 2 + rr ** 2))
    sa, sb = -torch.rand(5, generator=g) * 20, -torch.rand(5, generator=g) * 20
    p = 1 / (1 + torch.exp(-(rc - rr)))
    z = 2.0 * (sa - sb)
    torch.testing.assert_close(O.distill_loss(sa, sb, rc, rr, gamma=2.0), p * neg_logsig(z) + (1 - p) * neg_logsig(-z))


def test_distill_minimised_where_model_matches_soft_label():
    """d/dz BCE(p, sigma(z)) = sigma(z) - p: zero exactly at gamma*(sa-sb) = Rhat(a)-Rhat(b)."""
    sa = torch.tensor([0.0], requires_grad=True)
    loss = O.distill_loss(sa, torch.tensor([-0.8]), torch.tensor([1.6]), torch.tensor([0.0]), gamma=2.0)
    loss.sum().backward()
    assert abs(sa.grad.item()) < 1e-12


@pytest.mark.parametrize("scale", [1e3, -1e3])
def test_extreme_log_ratios_are_finite(scale):
    s = torch.full((4,), scale, requires_grad=True)
    z = torch.zeros(4)
    n = torch.full((4,), 3.0)
    losses = [O.dpo_loss(s, z, z, z, beta=1.0), O.pmle_loss(s, z), O.simpo_loss(s, z, n, n),
              O.cpo_loss(s, z, z, -s.detach(), n, n), O.distill_loss(s, z, z + scale, z),
              O.robust_dpo_loss(s, z, z, z, variant="robust"), O.rpo_loss(s, z, z, z, n),
              O.reward_bt_loss(s, z), O.ipo_loss(s, z, z, z, n, n), O.hinge_loss(s, z, z, z)]
    for loss in losses:
        assert torch.isfinite(loss).all()
        (grad,) = torch.autograd.grad(loss.sum(), s)
        assert torch.isfinite(grad).all()


def test_gradcheck_every_pairwise_objective():
    g = torch.Generator().manual_seed(3)
    for name, objective in O.PAIRWISE_OBJECTIVES.items():
        base = [-torch.rand(3, generator=g) * 10 for _ in range(4)]
        lengths = torch.tensor([2.0, 5.0, 7.0])

        def f(pc, pr, objective=objective, base=base):
            p = O.PairLogps(pc, pr, lengths, lengths, base[2], base[3])
            return objective(p)

        inputs = tuple(b.clone().requires_grad_(True) for b in base[:2])
        assert torch.autograd.gradcheck(f, inputs), name


def test_frac_in_undesirable_counts_the_region():
    dp = torch.tensor([-1.0, -1.0, 1.0, -3.0])
    dr = torch.tensor([-2.0, 0.0, -2.0, -2.0])
    # only the first pair has delta_pi < 0 and delta_pi > delta_ref
    assert O.frac_in_undesirable(dp, dr).item() == pytest.approx(0.25)


def test_kl_estimators_and_score_function():
    lp, lr = torch.tensor([-1.0, -2.0, -0.5, -3.0]), torch.tensor([-1.5, -1.0, -0.5, -2.0])
    l = lp - lr
    torch.testing.assert_close(O.kl_estimate(lp, lr, "k1"), l)
    torch.testing.assert_close(O.kl_estimate(lp, lr, "k2"), 0.5 * l ** 2)
    torch.testing.assert_close(O.kl_estimate(lp, lr, "k3"), torch.exp(-l) - 1 + l)
    base = O.leave_one_out_baseline(l, group_size=2)
    torch.testing.assert_close(base, torch.tensor([l[1], l[0], l[3], l[2]]))
    x = lp.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(O.score_function_kl(x, lr, group_size=2).sum(), x)
    torch.testing.assert_close(grad, l - base)


def test_registry_validates_hyperparameters():
    dpo = O.get_pairwise_objective("dpo")
    dpo.validate({"beta": 0.2})
    with pytest.raises(ValueError, match="valid: \\['beta'\\]"):
        dpo.validate({"betaa": 0.2})
    with pytest.raises(ValueError, match="unknown pairwise method"):
        O.get_pairwise_objective("dpoo")
    assert not O.get_pairwise_objective("pmle").needs_reference
    assert not O.get_pairwise_objective("simpo").needs_reference
