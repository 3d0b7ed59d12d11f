"""Issue 16's conventions, each against values derived by hand: IPO's per-token log-ratios, RPO's batch
token mean, the reward model's centring term, CPO simple's bounded margin, CPO-normalised
frac_in_undesirable, TRL's implicit-reward metrics, the k3 sequence KL and REBEL's eta."""
import math

import pytest
import torch

from distalign import objectives as O
from distalign.training.tasks import pair_metrics


pytestmark = pytest.mark.usefixtures("float64_default")


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_ipo_averages_log_ratios_per_token_by_default():
    # chosen: (s - r) / |y| = (-4 + 6) / 2 = 1; rejected: (-9 + 6) / 3 = -1; h = 2; beta 0.5: target 1
    args = [torch.tensor([v]) for v in (-4.0, -9.0, -6.0, -6.0, 2.0, 3.0)]
    assert O.ipo_loss(*args, beta=0.5).item() == pytest.approx((2 - 1) ** 2)
    # summed: h = (-4 + 6) - (-9 + 6) = 5
    assert O.ipo_loss(*args, beta=0.5, per_token=False).item() == pytest.approx((5 - 1) ** 2)


def test_rpo_nll_is_one_token_mean_over_the_batch_by_default():
    pc, lc = torch.tensor([-4.0, -9.0]), torch.tensor([2.0, 3.0])
    z = torch.zeros(2)
    # DPO part: margin 0 -> log 2 each. NLL: TRL's -(sum s+)/(sum |y+|) = 13/5; per example mean 2 and 3
    batch = O.rpo_loss(pc, pc, z, z, lc, beta=0.1, alpha=1.0)
    torch.testing.assert_close(batch, torch.tensor([math.log(2) + 4 / 2.5, math.log(2) + 9 / 2.5]))
    assert batch.mean().item() == pytest.approx(math.log(2) + 13 / 5)
    example = O.rpo_loss(pc, pc, z, z, lc, beta=0.1, alpha=1.0, nll="example")
    torch.testing.assert_close(example, torch.tensor([math.log(2) + 2.0, math.log(2) + 3.0]))
    with pytest.raises(ValueError, match="nll"):
        O.rpo_loss(pc, pc, z, z, lc, nll="token")


def test_reward_centring_penalises_the_centre_and_l2_also_the_margin():
    rc, rr = torch.tensor([1.0, -0.5]), torch.tensor([0.5, 0.5])
    got = O.reward_bt_loss(rc, rr, center_rewards_coefficient=0.1)
    torch.testing.assert_close(got, torch.tensor([softplus(-0.5) + 0.1 * 1.5 ** 2, softplus(1.0) + 0.0]))
    # gradient of each penalty along the margin direction (R+, R-) -> (R+ + t, R- - t) at t = 0
    for kwargs, along_margin in (({"center_rewards_coefficient": 0.1}, 0.0), ({"l2": 0.1}, 2 * 0.1 * (2.0 - 0.5))):
        r_plus, r_minus = torch.tensor([2.0], requires_grad=True), torch.tensor([0.5], requires_grad=True)
        penalty = O.reward_bt_loss(r_plus, r_minus, **kwargs) - O.reward_bt_loss(r_plus, r_minus)
        g_plus, g_minus = torch.autograd.grad(penalty.sum(), (r_plus, r_minus))
        assert (g_plus - g_minus).item() == pytest.approx(along_margin)


def test_cpo_simple_margin_is_bounded_when_the_reference_is_confident():
    """rbar- -> 0 (the reference is sure of the rejected response): the old 1/|rbar| margin was 5e5 nats."""
    one = torch.ones(1)
    ref_chosen, ref_rejected = torch.tensor([-20.0]), torch.tensor([-1e-9])
    margin = O.simple_margin(ref_chosen, ref_rejected, one, one, margin=0.5)
    assert margin.item() == pytest.approx(0.5 * (1 / 21 + 1 / (1 + 1e-9)))
    s = torch.tensor([-1.0], requires_grad=True)  # the policy is indifferent: d_pi = 0
    loss = O.cpo_loss(s, torch.tensor([-1.0]), ref_chosen, ref_rejected, one, one, beta=0.1, margin=0.5,
                      variant="simple")
    assert loss.item() == pytest.approx(softplus(0.5 * (1 / 21 + 1 / (1 + 1e-9))))
    assert loss.item() < softplus(2 * 0.5)  # never above softplus(2g) while the policy is indifferent
    (grad,) = torch.autograd.grad(loss.sum(), s)
    assert math.isfinite(grad.item())
    # where the reference is unsure (|rbar| >> 1) the margin is the paper's g / |rbar| to O(1 / |rbar|)
    unsure = O.simple_margin(torch.tensor([-400.0]), torch.tensor([-400.0]), one, one, margin=0.5)
    assert unsure.item() == pytest.approx(0.5 * 2 / 400, rel=1 / 400)


def pairs(**values):
    t = {k: torch.tensor(v) for k, v in values.items()}
    return O.PairLogps(t["pc"], t["pr"], t["lc"], t["lr"], t.get("rc"), t.get("rr"))


def test_frac_in_undesirable_uses_cpo_length_normalised_deltas():
    """Summed: d_pi = -4 in (d_ref = -16, 0): inside U. Per token: d_pi = -1 + 3 = 2 > 0: outside."""
    metrics = pair_metrics(pairs(pc=[-10.0], pr=[-6.0], lc=[10.0], lr=[2.0], rc=[-20.0], rr=[-4.0]))
    assert metrics["frac_in_undesirable"].tolist() == [0.0]
    metrics = pair_metrics(pairs(pc=[-10.0], pr=[-6.0], lc=[1.0], lr=[1.0], rc=[-20.0], rr=[-4.0]))
    assert metrics["frac_in_undesirable"].tolist() == [1.0]


def test_pair_metrics_log_trl_implicit_rewards():
    metrics = pair_metrics(pairs(pc=[-3.0, -5.0], pr=[-4.0, -1.0], lc=[1.0, 1.0], lr=[1.0, 1.0],
                                 rc=[-4.0, -4.0], rr=[-3.0, -3.0]), reward_scale=0.1)
    torch.testing.assert_close(metrics["rewards/chosen"], torch.tensor([0.1, -0.1]))
    torch.testing.assert_close(metrics["rewards/rejected"], torch.tensor([-0.1, 0.2]))
    torch.testing.assert_close(metrics["rewards/margins"], torch.tensor([0.2, -0.3]))
    assert metrics["rewards/accuracies"].tolist() == [1.0, 0.0]
    assert "rewards/chosen" not in pair_metrics(pairs(pc=[-3.0], pr=[-4.0], lc=[1.0], lr=[1.0]))


def test_sequence_kl_is_the_summed_k3_and_never_negative():
    lp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]])
    lr = torch.tensor([[-2.0, -1.0, -9.0], [-0.5, -1.5, -0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    l = lp - lr  # row 0: 1, -1 (third masked); row 1: 0, 1, 0
    k3 = lambda x: math.exp(-x) - 1 + x
    torch.testing.assert_close(O.sequence_kl_estimate(lp, lr, mask),
                               torch.tensor([k3(1.0) + k3(-1.0), k3(1.0)]))
    torch.testing.assert_close(O.sequence_kl_estimate(lp, lr, mask, "k1"), torch.tensor([0.0, 1.0]))
    assert (O.sequence_kl_estimate(lp, -lp.abs() - 3, mask) >= 0).all()
    assert l[0, 2] != 0  # the masked token would have counted


def test_rebel_eta_is_seed_001s_and_equals_the_rebel_papers_form_over_eta_squared():
    pa, pb, oa, ob = (torch.tensor([v]) for v in (-2.0, -5.0, -3.0, -4.0))
    ra, rb, eta = torch.tensor([1.5]), torch.tensor([0.5]), 2.0
    gap = (-2.0 + 3.0) - (-5.0 + 4.0)  # 2
    ours = O.rebel_loss(pa, pb, oa, ob, ra, rb, eta=eta)
    assert ours.item() == pytest.approx((gap - eta * 1.0) ** 2)  # seed 001 Eq. 10: (2 - 2)^2 = 0
    eta = 0.5
    ours = O.rebel_loss(pa, pb, oa, ob, ra, rb, eta=eta)
    assert ours.item() == pytest.approx((2 - 0.5) ** 2)
    rebel_paper = (gap / eta - 1.0) ** 2  # Gao et al. 2024: ((1/eta) gap - (R(a) - R(b)))^2
    assert (ours / eta ** 2).item() == pytest.approx(rebel_paper)


def test_cpo_refuses_hyperparameters_its_variant_ignores():
    cpo = O.get_pairwise_objective("cpo")
    cpo.validate({"variant": "simple", "margin": 0.5})
    with pytest.raises(ValueError, match=r"\['tau'\] have no effect with variant='simple'"):
        cpo.validate({"variant": "simple", "tau": 5.0})
    with pytest.raises(ValueError, match="margin"):
        cpo.validate({"variant": "clip", "margin": 0.5})
    with pytest.raises(ValueError, match="Contrastive Preference Optimization"):
        cpo.validate({"cpo_alpha": 1.0})  # TRL's CPOConfig key: another method


def test_ppo_token_rewards_without_a_reference_are_the_score_on_the_last_token():
    scores = torch.tensor([2.0, -1.0])
    logps = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    out = O.kl_penalized_token_rewards(scores, logps, None, mask, kl_coef=0.0)
    torch.testing.assert_close(out, torch.tensor([[0.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]))
