"""Language-level testbed experiments (lm-rate, the LM part of undesirable-space) and their helpers."""
import json
import math

import pytest
import torch

from distalign.testbed.experiments import lm_common, lm_rate, undesirable_space_lm
from distalign.testbed.lm_policy import hf_policy_logprob_fn, kl_target_to_policy, world_tokenizer


@pytest.fixture(scope="module")
def rate_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm-rate")
    return out, lm_rate.run(out, quick=True, seed=0)


@pytest.fixture(scope="module")
def us_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("us-lm")
    return out, undesirable_space_lm.run_lm(out, quick=True, seed=0)


def assert_files(out):
    stored = json.loads((out / "results.json").read_text())
    assert (out / "table.md").read_text().startswith("## ")
    pngs = list(out.glob("*.png"))
    assert pngs and all(p.stat().st_size > 1000 for p in pngs)
    return stored


def test_mean_kl_matches_hand_value():
    p = torch.log(torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64))
    q = torch.log(torch.tensor([[0.25, 0.75, 0.0]], dtype=torch.float64))
    expected = 0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0)     # the zero-probability entry adds 0
    assert lm_common.mean_kl(p, q) == pytest.approx(expected, abs=1e-12)


def test_support_table_kl_equals_lm_policy_enumeration():
    """The (X, M) table route and lm_policy's exact enumeration give the same KL for a random model."""
    import transformers
    world = lm_common.small_world(0)
    tokenizer = world_tokenizer(world)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                      max_position_embeddings=32, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    table = lm_common.support_logps(world, model, tokenizer)
    assert table.shape == (4, 4 + 16 + 64)
    direct = kl_target_to_policy(world, hf_policy_logprob_fn(model, tokenizer), method="exact").value
    assert lm_common.mean_kl(lm_common.world_logps(world), table) == pytest.approx(direct, rel=1e-9)
    assert lm_common.mean_kl(lm_common.world_logps(world), lm_common.world_logps(world, "reference")) == \
        pytest.approx(lm_common.reference_kl(world), rel=1e-9)


def test_dpo_limit_is_reference_times_target():
    """pi_inf ∝ ref * pi*: a uniform reference leaves pi* unchanged; otherwise the hand product."""
    target = torch.log(torch.tensor([[0.2, 0.3, 0.5]], dtype=torch.float64))
    uniform = torch.full_like(target, math.log(1 / 3))
    torch.testing.assert_close(lm_rate.dpo_limit_logps(uniform, target), target)
    ref = torch.log(torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64))
    product = torch.tensor([0.1, 0.075, 0.125], dtype=torch.float64)
    torch.testing.assert_close(lm_rate.dpo_limit_logps(ref, target).exp()[0], product / product.sum())


def test_empirical_dpo_loss_hand_values():
    delta_ref = torch.tensor([-3.0], dtype=torch.float64)
    p_hat = torch.tensor([0.75], dtype=torch.float64)
    assert undesirable_space_lm.empirical_dpo_loss(delta_ref, delta_ref, p_hat) == pytest.approx(math.log(2))
    h = 1.0                                         # delta_pi - delta_ref
    expected = 0.75 * math.log1p(math.exp(-h)) + 0.25 * math.log1p(math.exp(h))
    assert undesirable_space_lm.empirical_dpo_loss(delta_ref + h, delta_ref, p_hat) == pytest.approx(expected)


def test_pair_rows_follow_label_share():
    pair = {"prompt": "write about cats", "chosen": "ka", "rejected": "lo", "p_hat": 0.6875}
    rows = undesirable_space_lm.pair_rows([pair])
    assert len(rows) == undesirable_space_lm.ROWS_PER_PAIR
    assert sum(r["chosen"] == "ka" for r in rows) == 11
    share = undesirable_space_lm.label_share(torch.tensor([0.999, 0.001, 0.5], dtype=torch.float64))
    assert share.tolist() == [15 / 16, 1 / 16, 0.5]       # both orders always occur


def test_lm_rate_quick_outputs_and_structure(rate_run):
    out, results = rate_run
    stored = assert_files(out)
    assert {"ns", "runs", "kl_target_to_start", "kl_target_to_pi0", "kl_target_to_dpo_limit", "verdict",
            "protocol", "seconds"} <= set(stored)
    ns = results["ns"]
    for method in ("pmle", "dpo"):
        run = results["runs"][method]
        assert set(run["kl_per_seed"]) == set(ns)
        values = [v for n in ns for v in run["kl_per_seed"][n]]
        assert all(math.isfinite(v) and v > 0 for v in values)
        assert run["mean_kl"][ns[0]] == pytest.approx(sum(run["kl_per_seed"][ns[0]]) / results["seeds"])
        assert math.isfinite(run["slope"])
    # estimation from the SFT start: at the largest quick n PMLE is well below where it started
    assert results["runs"]["pmle"]["mean_kl"][ns[-1]] < 0.8 * results["kl_target_to_start"]
    assert "O(1/n)" in (out / "table.md").read_text()


def test_undesirable_space_lm_quick_outputs_and_claims(us_run):
    out, results = us_run
    stored = assert_files(out)
    assert {"pairs", "runs", "verdict", "protocol", "seconds"} <= set(stored)
    pairs = results["pairs"]
    gap = undesirable_space_lm.MIN_TARGET_GAP
    assert all(p["delta_ref"] < -1.0 and p["delta_target"] >= gap for p in pairs)
    assert all(len(p["chosen"].split()) == len(p["rejected"].split()) for p in pairs)
    for method, history in results["runs"].items():
        assert history["step"][0] == 0 and history["step"][-1] == results["protocol"]["steps"]
        # step 0: the policy is its own reference, so delta_pi = delta_ref and the DPO loss is log 2
        assert history["dpo_loss"][0] == pytest.approx(math.log(2), abs=1e-4), method
        assert all(0.0 <= f <= 1.0 for f in history["frac_in_undesirable"])
    dpo = results["runs"]["dpo"]
    # DPO's stationary points are all negative here (see the table), so it ends inside U with a lower loss
    assert max(p["dpo_stationary_delta_pi"] for p in pairs) < -1.0
    assert dpo["dpo_loss"][-1] < math.log(2) and dpo["frac_in_undesirable"][-1] > 0.5
    for method in ("cpo_clip", "pmle"):
        assert results["runs"][method]["delta_pi_mean"][-1] > 0, method
