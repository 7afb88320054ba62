"""Tests of studies/study.py, the studies beside opd.py: the verdict on a run, the ranking, the
warning signals, the reports on real run folders, and the chunked loss's memory.

    python -m pytest -q studies
"""
import json
import math
import sys
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

HERE = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(HERE), str(HERE / "studies")]
import opd  # noqa: E402
import study  # noqa: E402
from test_opd import work  # noqa: E402,F401  (a fixture: the command line's tiny run)


def _rows(acc, trunc, every=20):
    """metrics.jsonl rows: a training row per step with its truncation rate, and the held-out
    accuracies at steps 0, every, 2 * every, ... and after the last step."""
    rows = []
    for s, t in enumerate(trunc):
        r = {"step": s, "rollout/trunc_rate": t}
        if s % every == 0:
            r["eval/accuracy"] = acc[s // every]
        rows.append(r)
    return rows + [{"step": len(trunc), "eval/accuracy": acc[-1]}]


def test_shape_on_hand_made_runs():
    """shape(): learned (+0.10 at an evaluation with truncation <= 0.05 on every step before it),
    collapsed (take-off, truncation >= 0.5, final 0.15 under the peak), persisted (>= 0.3 on most
    steps after it). A guarded run that learned, loops briefly and recovers to a later peak learned."""
    up_down = [0.5, 0.7, 0.7, 0.3, 0.1]                              # evals at 0, 20, 40, 60, 80 and the end
    collapse = [0.0] * 50 + [0.6] * 30
    v = study.shape(_rows(up_down + [0.1], collapse))
    assert (v["learned"], v["collapsed"], v["persisted"]) == (True, True, True)
    assert v["verdict"] == "learned, then collapsed"
    heal = [0.0] * 50 + [0.6] * 5 + [0.0] * 25
    assert study.shape(_rows(up_down + [0.1], heal))["verdict"] == "learned, then collapsed, partly recovered"
    early = [0.0] * 10 + [0.6] * 70                                    # truncation before the peak
    assert study.shape(_rows(up_down + [0.1], early))["verdict"] == "collapsed before learning"
    flat = study.shape(_rows([0.5, 0.55, 0.58, 0.58, 0.58, 0.58], [0.0] * 80))
    assert flat["verdict"] == "did not learn, no collapse" and not flat["learned"]
    kept = study.shape(_rows([0.5, 0.7, 0.7, 0.7, 0.65, 0.65], [0.0] * 50 + [0.6] * 30))
    assert kept["verdict"] == "learned, inflated, kept its accuracy" and not kept["collapsed"]
    assert study.shape(_rows([0.5, 0.7, 0.8, 0.8, 0.8, 0.8], [0.0] * 80))["verdict"] == "learned, no collapse"
    guarded = [0.0] * 45 + [0.2] * 5 + [0.0] * 30                          # loops at 45-49, then healed
    assert study.shape(_rows([0.5, 0.7, 0.6, 0.8, 0.85, 0.85], guarded))["verdict"] == "learned, no collapse"


def test_ranking_sorts_by_the_worst_seed_and_counts_what_held():
    """A method with a better mean but one bad seed ranks below one whose worst seed is better;
    held = truncation <= 0.1 on every step and final >= plain OPD's mean peak."""
    def run(m, s, final, trunc):
        rows = _rows([0.5, 0.8, final], [trunc] * 30)
        for r in rows:
            r.update({f"time/{k}_s": 1.0 for k in ("rollout", "teacher", "update")} if "rollout/trunc_rate" in r else {})
            r.update({"rollout/len_mean": 10, "rollout/rep_rate": 0, "eval/accuracy_sampled": 0.5})
        return m, s, rows
    results = [run("opd", 0, 0.1, 0.6), run("opd", 1, 0.1, 0.6),
               run("seq-kd", 0, 0.95, 0.0), run("seq-kd", 1, 0.2, 0.0),
               run("stable-opd", 0, 0.85, 0.0), run("stable-opd", 1, 0.81, 0.05)]
    rows = [study.summarize(m, s, r) for m, s, r in results]
    table = study.ranking_table(rows, results, {"opd": 2.0, "seq-kd": 3.0, "stable-opd": 2.0}).splitlines()[2:]
    assert [l.split("|")[1].strip() for l in table] == ["stable-opd", "seq-kd", "opd"]
    cells = [c.strip() for c in table[0].strip("|").split("|")]
    assert cells[1] == "yes" and cells[2] == "1.00" and cells[-1] == "2/2" and cells[-3] == "0/2"
    assert [c.strip() for c in table[1].strip("|").split("|")][1:3] == ["no", "1.50"]


@given(st.lists(st.floats(0, 1), min_size=1, max_size=40), st.floats(0, 1), st.integers(1, 4))
def test_fire_step_needs_patience_consecutive_values(values, thr, patience):
    steps = list(range(len(values)))
    got = study.fire_step(steps, values, thr, patience, start=0)
    want = next((i for i in steps if i + 1 >= patience and all(v > thr for v in values[i + 1 - patience:i + 1])), "")
    assert got == want


def _planted_run(folder, name, takeoff, warn, steps=120):
    """metrics.jsonl of a run whose repetition rate rises from step `warn` and truncation from `takeoff`."""
    d = folder / name
    d.mkdir(parents=True)
    with open(d / "metrics.jsonl", "w") as f:
        for s in range(steps):
            rep = 0.0 if warn is None or s < warn else 0.05
            trunc = 0.0 if takeoff is None or s < takeoff else 0.6
            f.write(json.dumps({"step": s, "rollout/trunc_rate": trunc, "rollout/rep_rate": rep, "rollout/ngram_rep": 0.2,
                                "rollout/growth": 0.0, "rollout/len_p90": 12, "logp/teacher": -0.5, "adv/repetitive": float("nan"),
                                "adv/regular": -0.3, "adv/repetitive_frac": rep, "eos/teacher_lower_frac": 0.1}) + "\n")


def test_signal_table_scores_lead_and_false_alarms(tmp_path):
    """Collapsing fit runs warned 20 steps ahead, quiet ones never: the repetition rate gets a lead
    of 19 on them (patience 2: the alert comes one step after the rise); a held-out quiet run whose
    repetition rises anyway is counted as a false alarm."""
    for seed in range(3):
        _planted_run(tmp_path, f"opd-s{seed}", takeoff=80, warn=60)
        _planted_run(tmp_path, f"stable-opd-s{seed}", takeoff=None, warn=None)
    _planted_run(tmp_path, "opd-s3", takeoff=90, warn=70)
    _planted_run(tmp_path, "sft-only-s3", takeoff=None, warn=50)
    row = next(l for l in study.signal_table(tmp_path).splitlines() if l.startswith("| repetition rate"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:] == ["19, 19, 19", "0 of 3 quiet", "19", "1 of 1 quiet"], cells


def test_chunked_loss_peaks_lower_in_memory():
    """loss_peak_memory: the chunked loss (32 positions at a time) needs a fraction of the memory of
    the unchunked one for a 30,000-token vocabulary, and gives the same loss."""
    kw = dict(vocab=30_000, batch=2, length=256, hidden=16)
    whole = study.loss_peak_memory(**kw, chunk=0)
    chunked = study.loss_peak_memory(**kw, chunk=32)
    assert chunked["loss_mb"] < 0.6 * whole["loss_mb"] and whole["loss_mb"] > 150, (whole, chunked)
    assert chunked["loss"] == pytest.approx(whole["loss"], rel=1e-5)


def test_reports_on_run_folders(work, tmp_path):
    """`runs` and `collapse` on the command line's tiny run: the tables the docs quote, each under its
    name, the CSV and the figure; a folder without runs is one line and exit code 2."""
    study.main(["runs", str(tmp_path / "r"), str(work / "runs")])
    text = (tmp_path / "r" / "results.md").read_text()
    for part in ("runs", "summary", "evals", "positions", "stops", "time"):
        assert f"\n### {part}\n" in text, part
    assert "learned" in text or "did not learn" in text                 # shape()'s verdict
    assert (tmp_path / "r" / "fig1_accuracy_length.png").stat().st_size > 10_000
    study.main(["collapse", str(tmp_path / "c"), str(work / "runs")])
    assert "### phases" in (tmp_path / "c" / "results.md").read_text()
    with pytest.raises(SystemExit) as e:
        study.main(["runs", str(tmp_path / "x"), str(tmp_path)])
    assert e.value.code == 2


def test_compare_writes_the_ranking(tmp_path, monkeypatch):
    """`compare` on two presets, one seed, 3 steps, the cost stubbed: the summary, the runs, the
    ranking, the late fixes and the ranking's figure."""
    monkeypatch.setattr(study, "measure_cost", lambda base, methods, steps=25: {m: 1.0 for m in methods})
    study.main(["compare", str(tmp_path / "all"), "--methods", "opd,drop-trunc", "--seeds", "1", "--steps", "3",
                "--batch-size", "8", "--eval-size", "8", "--eval-every", "3", "--max-new-tokens", "12",
                "--workers", "1", "--out-dir", str(tmp_path / "runs")])
    text = (tmp_path / "all" / "results.md").read_text()
    assert all(f"\n### {p}\n" in text for p in ("summary", "runs", "ranking", "late-fixes"))
    assert (tmp_path / "all" / "ranking.png").exists()
