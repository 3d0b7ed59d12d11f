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
    for name in ("pmle", "distill_fitted", "reverse_kl"):
        assert -1.3 <= rate["slopes"][name]["slope"] <= -0.7, (name, rate["slopes"][name])
    assert rate["dpo_minus_pmle"] < 1e-8  # uniform reference, beta = gamma: DPO is PMLE
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
