"""`distalign demo`: the README's first command. The quick run end to end, its claims, the sweep's record
behind the settings, the plot's labels, and determinism."""
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from distalign.demo import DemoSettings, run_demo
from distalign.demo.claims import CLAIMS, SWEEP_CLAIMS, check_claims
from distalign.demo.methods import CHOSEN, GRID, GRID_SIZE, VALIDATION_SEED, rows
from distalign.demo.plot import merge_coincident, place_labels, text_box
from distalign.demo.sweep import choose, run_sweep

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "quick"
    run = subprocess.run([sys.executable, "-m", "distalign", "demo", "--quick", "--out", str(out)],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout, out, json.loads((out / "results.json").read_text())


def test_quick_demo_writes_table_plot_and_report(quick_run):
    stdout, out, record = quick_run
    assert "| model | win-rate vs SFT (exact) | win-rate vs SFT (sampled)" in stdout
    assert "| *online, oracle reward γ log π** |" in stdout
    results = record["results"]
    for row in rows(DemoSettings().methods):
        assert 0.0 <= results[row.name]["win_rate_exact"] <= 1.0 and results[row.name]["kl_target_to_policy"] >= 0
        assert record["settings"]["row_settings"][row.name][-len(CHOSEN["quick"][row.name]):] == \
            CHOSEN["quick"][row.name]
    assert results["sft"]["kl_to_sft"] == 0.0 and results["pi* (target)"]["kl_target_to_policy"] == 0.0
    assert results["pi* (target)"]["off_support_mass"] == 0.0
    assert "validation seed 1" in record["settings"]["settings_chosen_by"]
    assert (out / "winrate_vs_kl.png").stat().st_size > 10_000
    assert "## Findings" in (out / "report.md").read_text()


def test_sft_against_itself_reads_half_with_its_error_bar(quick_run):
    stdout, _, record = quick_run
    sft = record["results"]["sft"]
    assert sft["win_rate_exact"] == pytest.approx(0.5, abs=1e-9)
    assert abs(sft["win_rate_vs_sft"] - 0.5) <= 2 * sft["win_rate_vs_sft_stderr"]
    sft_line = next(line for line in stdout.splitlines() if line.startswith("| sft |"))
    assert sft_line.split("|")[3].strip().count("±") == 1           # the sampled win-rate shows its s.e.


def test_readme_claims_hold_on_the_quick_run(quick_run):
    failed = [text for text, holds in check_claims(quick_run[2]["results"]) if holds is not True]
    assert not failed, failed


def test_readme_claims_hold_on_the_full_run_and_are_in_the_readme():
    """docs/demo_results.json is the full run the README's table and plot come from."""
    full = json.loads((DOCS / "demo_results.json").read_text())
    failed = [text for text, holds in check_claims(full["results"]) if holds is not True]
    assert not failed, failed
    readme = " ".join((ROOT / "README.md").read_text().split())
    missing = [claim.text for claim in (*CLAIMS, *SWEEP_CLAIMS) if " ".join(claim.text.split()) not in readme]
    assert not missing, missing
    table = (DOCS / "demo_table.md").read_text().strip()
    assert table in (ROOT / "README.md").read_text()
    assert full["settings"]["seed"] != VALIDATION_SEED


@pytest.mark.parametrize("variant", ["full", "quick"])
def test_chosen_settings_are_the_sweep_records(variant):
    record = json.loads((DOCS / f"demo_sweep_{variant}.json").read_text())
    assert record["variant"] == variant and record["validation_seed"] == VALIDATION_SEED != 0
    assert record["chosen"] == CHOSEN[variant]
    assert set(CHOSEN[variant]) == {row.name for row in rows(DemoSettings().methods)}
    for name, entry in record["rows"].items():
        grid = [point["settings"] for point in entry["grid"]]
        method = next(row.method for row in rows(DemoSettings().methods) if row.name == name)
        assert grid == GRID[method] and len(grid) == GRID_SIZE            # the same budget for every row
        assert entry["chosen"] == grid[choose(entry["grid"])]


def test_readme_sweep_claims_hold_on_both_sweep_records():
    for variant in ("full", "quick"):
        record = json.loads((DOCS / f"demo_sweep_{variant}.json").read_text())
        failed = [text for text, holds in check_claims(record, SWEEP_CLAIMS) if holds is not True]
        assert not failed, (variant, failed)


def test_every_grid_has_the_same_budget():
    assert {len(grid) for grid in GRID.values()} == {GRID_SIZE}


def test_choose_takes_the_lowest_exact_kl_and_the_first_of_ties():
    scores = [{"kl_target_to_policy": v} for v in (1.2, 0.7, 0.9, 0.7)]
    assert choose(scores) == 1


def test_sweep_trains_every_grid_point_and_records_it(tmp_path):
    tiny = replace(DemoSettings.quick(seed=VALIDATION_SEED), methods=("dpo",), sft_steps=10, pair_steps=4,
                   reward_steps=4)
    record = run_sweep(tmp_path, settings=tiny, log=lambda *a: None)
    entry = record["rows"]["dpo"]
    assert [p["settings"] for p in entry["grid"]] == GRID["dpo"]
    kls = [p["kl_target_to_policy"] for p in entry["grid"]]
    assert len(set(kls)) == GRID_SIZE                                  # each setting changed the model
    assert entry["chosen"] == GRID["dpo"][kls.index(min(kls))] == record["chosen"]["dpo"]
    assert json.loads((tmp_path / "sweep.json").read_text())["chosen"] == record["chosen"]


def test_coincident_points_share_a_label_that_says_so():
    merged = merge_coincident([(10.0, 10.0), (12.0, 11.0), (50.0, 10.0)], ["a", "b", "c"])
    assert merged == [(0, "a & b (overlap)"), (2, "c")]


def test_labels_do_not_overlap():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    points = [(1.0 + 0.02 * i, 0.5 + 0.01 * (i % 3)) for i in range(8)] + [(3.0, 0.2), (3.05, 0.21)]
    ax.plot(*zip(*points), "o")
    ax.set_xlim(0.5, 3.5)
    ax.set_ylim(0.0, 1.0)
    fig.canvas.draw()
    notes = place_labels(ax, [(p, f"method_{i}") for i, p in enumerate(points)])
    renderer = fig.canvas.get_renderer()
    boxes = [text_box(note, renderer) for note in notes]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), (a, b)
    plt.close(fig)


def test_demo_is_deterministic_for_a_seed(tmp_path):
    tiny = replace(DemoSettings.quick(seed=3), methods=("dpo", "grpo"), sft_steps=10, pair_steps=4,
                   reward_steps=4, online_steps=2, eval_samples_per_prompt=8)
    first = run_demo(tmp_path / "a", settings=tiny, log=lambda *a: None)["results"]
    second = run_demo(tmp_path / "b", settings=tiny, log=lambda *a: None)["results"]
    assert first == second
    assert set(first) >= {"dpo", "grpo", "grpo (oracle reward)", "sft", "pi* (target)"}
    assert "not applicable" in (tmp_path / "a" / "report.md").read_text()     # pmle's claims: no pmle row
