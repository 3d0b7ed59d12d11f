"""Testbed experiments in quick mode: their claims and the files they write."""
import json

import pytest

from distalign.testbed import experiments as ex

TABULAR = ("rate", "rkl-optimum", "dpo-degeneracy", "undesirable-space", "coverage", "misspecification")


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("testbed")
    return root, {name: ex.run_experiment(name, root / name, quick=True, seed=0) for name in TABULAR}


@pytest.mark.parametrize("name", TABULAR)
def test_experiment_writes_results_table_and_plots(quick_runs, name):
    root, _ = quick_runs
    out = root / name
    assert json.loads((out / "results.json").read_text())
    assert (out / "table.md").read_text().startswith("## ")
    pngs = list(out.glob("*.png"))
    assert pngs and all(p.stat().st_size > 1000 for p in pngs)


def test_quick_rate_slope_near_minus_one(quick_runs):
    rate = quick_runs[1]["rate"]
    for name in ("pmle", "distill_fitted", "reverse_kl_beta0", "reverse_kl", "dpo"):
        assert -1.3 <= rate["slopes"][name]["slope"] <= -0.7, (name, rate["slopes"][name])
    assert rate["dpo_minus_pmle"] < 1e-8  # dpo_uniform_ref: uniform reference, beta = gamma: DPO is PMLE
    # DPO with the pi0 reference converges to pi_inf ∝ pi0 pi*: its KL to pi* stays near the floor
    dpo_last = rate["objectives"]["dpo"][str(rate["protocol"]["ns"][-1])]
    assert rate["dpo_floor"] > 0.1 and abs(dpo_last["mean_kl_to_target"] - rate["dpo_floor"]) < 0.1 * rate["dpo_floor"]
    assert dpo_last["mean_kl"] < 0.05 * rate["dpo_floor"]
    # Theorem 7's row is scored as KL(pi_hat || pi*): equal to pi*'s forward KL only to first order
    beta0 = rate["objectives"]["reverse_kl_beta0"]["1000"]
    assert beta0["mean_kl"] != beta0["mean_kl_to_target"]
    assert beta0["mean_kl"] == pytest.approx(beta0["mean_kl_to_target"], rel=0.3)
    assert max(rate["population_error"].values()) < 1e-8  # n = infinity fits hit the closed forms
    first = rate["objectives"]["pmle"][str(1000)]
    assert len(first["kl_per_seed"]) == rate["protocol"]["n_seeds"]
    assert first["mean_kl"] == pytest.approx(sum(first["kl_per_seed"]) / len(first["kl_per_seed"]))


def test_rkl_optimum_matches_closed_form(quick_runs):
    result = quick_runs[1]["rkl-optimum"]
    assert result["all_passed"]
    assert all(c["rlhf_form_error"] < 1e-4 for c in result["cells"] if c["gamma"] == 0)


def test_dpo_degeneracy_family_and_rlhf(quick_runs):
    result = quick_runs[1]["dpo-degeneracy"]
    assert result["max_loss_spread_across_alpha"] < 1e-12  # the loss ignores the mass on y3
    assert result["dpo_infimum_approached"] < 0.2
    assert result["rlhf_max_y3_mass"] == 0.0


def test_dpo_stays_in_undesirable_space_while_cpo_and_pmle_leave(quick_runs):
    runs = quick_runs[1]["undesirable-space"]["tabular"]["runs"]
    assert runs["dpo"]["frac_in_undesirable"][-1] > 0.5
    assert runs["dpo"]["dpo_loss"][-1] < runs["dpo"]["dpo_loss"][0]  # loss fell although inside U
    for name in ("cpo_full", "cpo_simple", "cpo_clip", "pmle"):
        assert runs[name]["frac_in_undesirable"][-1] == 0.0
        assert min(runs[name]["delta_pi_final"]) > 0


def test_coverage_on_policy_beats_offline_only_with_the_smaller_reward_class(quick_runs):
    result = quick_runs[1]["coverage"]
    worst = result["results"][str(min(result["coverages"]))]
    for offline, online in (("offline/pmle", "reverse_kl_beta0"), ("offline/dpo", "rlhf")):
        off = worst[offline]["kl_pi_inf"]
        assert worst[f"linear/{online}"]["kl_pi_inf"] < 0.2 * off, online         # extrapolates via features
        assert 0.5 < worst[f"tabular/{online}"]["kl_pi_inf"] / off < 2.0, online   # reward = policy class
    # the same linear reward model: offline distillation's policy step sees only mu's responses
    assert worst["linear/reverse_kl_beta0"]["kl_pi_inf"] < 0.2 * worst["linear/offline_distill"]["kl_pi_inf"]
    assert result["checks"]["realisability: max |softmax(R_linear,inf) - pi*| (population, full coverage)"] < 1e-8
    full = result["results"][str(max(result["coverages"]))]
    assert all(v["uncovered_mass"] == 0.0 for v in full.values() if isinstance(v, dict))
    assert len(result["verdict"]) == 6 and "BEATS" in result["verdict"][0]


def test_line_plot_names_curves_that_coincide(tmp_path):
    from distalign.testbed.plotting import coinciding, line_plot
    series = {"a": ([1, 2], [1.0, 2.0]), "b": ([1, 2], [1.0, 2.0 + 1e-12]), "c": ([1, 2], [1.0, 2.1])}
    assert coinciding(series) == [("a", "b")]
    path = line_plot(tmp_path / "p.png", series, "x", "y", "t", reference=("c",), note="a note")
    assert path.stat().st_size > 1000


def test_misspecification_grows_error(quick_runs):
    results = quick_runs[1]["misspecification"]["results"]
    noise = results["label_noise"]
    assert noise["0.3"]["pmle"] > 5 * noise["0.0"]["pmle"]
    assert results["condorcet"]["8.0"]["cyclic_contexts"] == 4


def test_registry_lists_language_level_and_skips_missing(tmp_path, monkeypatch):
    assert ex.EXPERIMENTS["lm-rate"] == "distalign.testbed.experiments.lm_rate:run"
    monkeypatch.setitem(ex.EXPERIMENTS, "missing", "distalign.testbed.experiments.no_such_module:run")
    with pytest.raises(ex.ExperimentUnavailable, match="no_such_module"):
        ex.load_experiment("missing")
    with pytest.raises(ValueError, match="unknown experiment"):
        ex.load_experiment("nope")
    monkeypatch.setattr(ex, "EXPERIMENTS", {"missing": "distalign.testbed.experiments.no_such_module:run"})
    assert ex.run_all(tmp_path, quick=True)["missing"].startswith("skipped")
