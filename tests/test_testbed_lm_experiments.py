"""Language-level testbed experiments (lm-rate, the LM part of undesirable-space) and their helpers."""
import copy
import json
import math

import pytest
import torch

from distalign.testbed import tabular_fit as tf
from distalign.testbed.experiments import lm_common, lm_rate, undesirable_space_lm
from distalign.testbed.lm import all_sequences
from distalign.testbed.lm_data import preference_pairs, preference_wins, write_jsonl
from distalign.testbed.lm_fit import SupportTable, fit_to_tolerance
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


def random_llama(tokenizer, seed: int):
    """A randomly initialised one-layer Llama over the world tokenizer, in eval mode."""
    import transformers
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                      max_position_embeddings=32, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def test_mean_kl_matches_hand_value():
    p = torch.log(torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64))
    q = torch.log(torch.tensor([[0.25, 0.75, 0.0]], dtype=torch.float64))
    expected = 0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0)     # the zero-probability entry adds 0
    assert lm_common.mean_kl(p, q) == pytest.approx(expected, abs=1e-12)


def test_support_table_kl_equals_lm_policy_enumeration():
    """The (X, M) table route and lm_policy's exact enumeration give the same KL for a random model."""
    world = lm_common.small_world(0)
    tokenizer = world_tokenizer(world)
    model = random_llama(tokenizer, seed=0)
    table = lm_common.support_logps(world, model, tokenizer)
    assert table.shape == (4, 4 + 16 + 64)
    direct = kl_target_to_policy(world, hf_policy_logprob_fn(model, tokenizer), method="exact").value
    assert lm_common.mean_kl(lm_common.world_logps(world), table) == pytest.approx(direct, rel=1e-9)
    assert lm_common.mean_kl(lm_common.world_logps(world), lm_common.world_logps(world, "reference")) == \
        pytest.approx(lm_common.reference_kl(world), rel=1e-9)


def test_dpo_limit_is_reference_times_target():
    """pi_inf ∝ ref * pi*^(gamma/beta): a uniform reference leaves pi* unchanged; otherwise the hand product."""
    target = torch.log(torch.tensor([[0.2, 0.3, 0.5]], dtype=torch.float64))
    uniform = torch.full_like(target, math.log(1 / 3))
    torch.testing.assert_close(lm_rate.dpo_limit_logps(uniform, target), target)
    ref = torch.log(torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64))
    product = torch.tensor([0.1, 0.075, 0.125], dtype=torch.float64)
    torch.testing.assert_close(lm_rate.dpo_limit_logps(ref, target).exp()[0], product / product.sum())
    squared = torch.tensor([0.5 * 0.04, 0.25 * 0.09, 0.25 * 0.25], dtype=torch.float64)
    torch.testing.assert_close(lm_rate.dpo_limit_logps(ref, target, 2.0).exp()[0], squared / squared.sum())


def test_strongly_connected_by_hand():
    cycle = torch.tensor([[[0, 1, 0], [0, 0, 1], [1, 0, 0]]], dtype=torch.float64)    # 0 > 1 > 2 > 0
    chain = torch.tensor([[[0, 1, 0], [0, 0, 1], [0, 0, 0]]], dtype=torch.float64)    # 2 never wins
    assert lm_rate.strongly_connected(cycle) and not lm_rate.strongly_connected(chain)
    assert lm_rate.strongly_connected(chain, directed=False)
    assert not lm_rate.strongly_connected(torch.zeros(1, 3, 3), directed=False)


def test_reward_features_hold_gamma_log_target():
    """gamma log pi* - gamma log pi0 is a per-prompt word-count reward plus a per-prompt constant."""
    world = lm_rate.rate_world(0)
    features = lm_rate.reward_features(world)
    assert features.shape == (4, 12, 1 + 4 * 3)
    target = lm_common.world_logps(world)
    design = torch.cat([features.flatten(0, 1), torch.eye(4, dtype=torch.float64).repeat_interleave(12, 0)], -1)
    fitted = design @ torch.linalg.lstsq(design, target.flatten()[:, None]).solution
    torch.testing.assert_close(fitted[:, 0], target.flatten(), atol=1e-10, rtol=0)
    no_counts = design[:, [0] + list(range(13, 17))]          # log pi0 and constants alone cannot
    rest = no_counts @ torch.linalg.lstsq(no_counts, target.flatten()[:, None]).solution
    assert float((rest[:, 0] - target.flatten()).abs().max()) > 0.1


@pytest.fixture(scope="module")
def rate_model():
    world = lm_rate.rate_world(0)
    tokenizer = world_tokenizer(world)
    return world, random_llama(tokenizer, seed=1).double(), tokenizer


def test_support_table_constrains_to_the_world(rate_model):
    """Constrained rows sum to 1; the bare network's table equals the unconstrained scorer's and
    leaves mass outside the world; constraining is a per-token renormalisation over allowed tokens."""
    world, model, tokenizer = rate_model
    table = SupportTable(world, model, tokenizer)
    with torch.no_grad():
        constrained, bare = table.logps(), table.logps(constrained=False)
    torch.testing.assert_close(constrained.exp().sum(-1), torch.ones(4, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(bare, lm_common.support_logps(world, model, tokenizer), atol=1e-10, rtol=0)
    assert float(bare.exp().sum(-1).max()) < 0.5              # a random network mostly writes other text
    # "ka": first word (no EOS allowed), then EOS at a position where words or EOS may follow
    allowed = tokenizer.convert_tokens_to_ids(list(world.words))
    prompt = tokenizer(world.prompts[0])["input_ids"]
    ka = tokenizer.convert_tokens_to_ids(world.words[0])
    with torch.no_grad():
        first = torch.log_softmax(model(torch.tensor([prompt])).logits[0, -1, allowed], -1)[0]
        second = torch.log_softmax(model(torch.tensor([prompt + [ka]])).logits[0, -1,
                                                                              allowed + [tokenizer.eos_token_id]], -1)[-1]
    index = world.decode(all_sequences(3, 2)).index(world.words[0])
    assert float(constrained[0, index]) == pytest.approx(float(first + second), abs=1e-10)


def test_fit_to_tolerance_reaches_the_certified_minimum(rate_model):
    """A random network fitted to PMLE on 50000 pairs stops inside the tolerance, at the tabular
    minimiser's table; a tiny evaluation budget stops it early and says so."""
    world, model, tokenizer = rate_model
    start = copy.deepcopy(model.state_dict())
    table = SupportTable(world, model, tokenizer)
    wins = preference_wins(world, 50_000, seed=7)[None]
    assert lm_rate.strongly_connected(wins)
    fit = tf.pmle_fit(wins, world.gamma, prior=0.0)
    minimum = tf.solve([fit])[0][0]
    def objective(t):
        return fit.objective(t[None]).sum()
    loss_min, loss_ref = float(objective(minimum)), float(objective(lm_common.world_logps(world)))
    try:
        report = fit_to_tolerance(table, objective, loss_min, loss_ref, rel_tol=0.01, max_evaluations=3000)
        with torch.no_grad():
            fitted = table.logps()
        assert report.converged and report.stop_reason == "tolerance"
        assert 0.0 <= report.gap <= report.tolerance == pytest.approx(0.01 * (loss_ref - loss_min), rel=1e-6)
        assert report.loss == pytest.approx(float(objective(fitted)), abs=1e-12)
        # within 1% of the excess loss, the network's table is close to the minimiser's next to the error
        assert lm_common.mean_kl(minimum, fitted) < 0.05 * lm_common.mean_kl(lm_common.world_logps(world), minimum)
        model.load_state_dict(start)
        short = fit_to_tolerance(table, objective, loss_min, loss_ref, rel_tol=0.01, max_evaluations=10)
        assert not short.converged and short.stop_reason == "max_evaluations" and short.gap > short.tolerance
        assert 10 <= short.evaluations <= 10 + 25 + 1     # checked after each L-BFGS step of <= 25 evaluations
    finally:
        model.load_state_dict(start)


def test_table_objective_is_the_offline_trainers_loss(tmp_path):
    """The win-count weighted objective on the (X, M) table equals the OfflineTrainer's mean loss over
    the same pairs (PMLE and DPO through the trainer's own batches and reference)."""
    world = lm_rate.rate_world(0)
    init = lm_common.make_world_model(world, tmp_path / "init", seed=0)
    write_jsonl(tmp_path / "pairs.jsonl", preference_pairs(world, 64, seed=3))
    wins = preference_wins(world, 64, seed=3)[None]
    for method, loss in (("pmle", {"gamma": 1.0}), ("dpo", {"beta": 0.5})):
        trainer = lm_common.run_offline(method, init, tmp_path / "pairs.jsonl", tmp_path / method, steps=1,
                                        batch_size=64, learning_rate=1e-3, loss=loss, train_steps=False)
        module = lm_common.trained_module(trainer)
        batch = trainer.batch(torch.arange(64), trainer.train_records)
        with torch.no_grad():
            expected = float(trainer.task.loss(module, batch, trainer.reference)[0].mean())
            bare = SupportTable(world, module, trainer.tokenizer).logps(constrained=False)
        fit = (tf.pmle_fit(wins, 1.0, prior=0.0) if method == "pmle"
               else tf.dpo_fit(wins, bare[None], 0.5, prior=0.0))
        assert float(fit.objective(bare[None]).sum()) == pytest.approx(expected, abs=2e-5), method


def test_lm_rate_quick_outputs_convergence_and_claims(rate_run):
    out, results = rate_run
    stored = assert_files(out)
    assert {"ns", "runs", "summary", "population_error", "kl_target_to_dpo_limit", "verdict", "protocol",
            "seconds"} <= set(stored)
    assert stored["protocol"]["validation_seed"] != results["seed"]
    ns = results["ns"]
    for method in lm_rate.METHODS:
        for n in ns:
            reports = results["runs"][method][n]
            assert len(reports) == results["seeds"]
            for r in reports:      # the stopping rule is recorded and met, against the certified minimum
                assert r["converged"] and r["finite_minimum"] and r["evaluations"] > 0
                assert -1e-9 <= r["gap"] <= r["tolerance"] and r["loss"] < r["loss_ref"]
                assert r["kl_to_minimiser"] < 0.05 * r["kl_limit"]
        s = results["summary"][method]
        first, last = (s["per_n"][n]["mean_kl"] for n in (ns[0], ns[-1]))
        assert 2.0 < first / last < 32.0, method            # n grew 8x: O(1/n) predicts 8
        assert s["per_n"][ns[0]]["mean_kl"] == pytest.approx(
            sum(r["kl_limit"] for r in results["runs"][method][ns[0]]) / results["seeds"])
    assert max(results["population_error"].values()) < 1e-8
    dpo = results["summary"]["dpo"]["per_n"][ns[-1]]
    floor = results["kl_target_to_dpo_limit"]
    assert floor > 0.05 and abs(dpo["mean_kl_target"] - floor) < 0.1 * floor   # at its own limit, not pi*
    table = (out / "table.md").read_text()
    assert "Every fit" in table and table.count("| pmle |") >= len(ns) * (results["seeds"] + 1)


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
