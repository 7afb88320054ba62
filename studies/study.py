"""The studies beside opd.py: every fix compared on several seeds, and the reports that turn run
folders into the tables and figures of tutorial.md and plots/README.md. opd.py makes the runs;
this file reads them. Each command writes OUT/results.md (named tables, quoted by the docs and
checked by the tests) and OUT/results.csv (a row per run).

    python studies/study.py compare plots/all --seeds 5 --out-dir runs-all   # every preset
    python studies/study.py runs OUT FOLDER...       # run tables, verdicts, evaluations, positions
    python studies/study.py collapse OUT FOLDER      # plain OPD's phases and mechanism
    python studies/study.py signals OUT FOLDER...    # which warning signal comes first
    python studies/study.py builds OUT FOLDER...     # independent builds of the pair
    python studies/study.py memory OUT               # the chunked loss's memory
    python studies/study.py ranking OUT              # ranking.png again from OUT/results.csv

FOLDER is a run folder (holding metrics.jsonl) or a folder of them (<method>-s<seed>).
`compare` takes opd.py's flags after OUT and runs every preset (--methods all) by default.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import opd  # noqa: E402
from opd import (METHODS, POSITION_BINS, TAKEOFF, Config, config_for, first_step,  # noqa: E402
                 markdown, read_metrics, run_opd, with_settings)
from opd import mean as _mean  # noqa: E402

# =============================================================================
# The verdict on a run
# =============================================================================

LEARNED = 0.10          # shape(): held-out accuracy gained by the peak over step 0
QUIET = 0.05            # shape(): truncation allowed on the steps before that peak
COLLAPSE_TRUNC = 0.5    # shape(): truncation a collapse reaches
COLLAPSE_DROP = 0.15    # shape(): accuracy a collapse loses from the peak by the end


def shape(rows) -> dict:
    """The verdict on one run, from its metrics.jsonl rows (tutorial, the collapse):

    learned    the held-out accuracy reached at least LEARNED above step 0 at an evaluation
               before which the rollouts' truncation had stayed at most QUIET on every step;
    collapsed  the run took off (truncation > TAKEOFF), truncation reached COLLAPSE_TRUNC, and
               the final accuracy is at least COLLAPSE_DROP under the peak;
    persisted  after the take-off, truncation stayed at or above TAKEOFF on most steps.
    """
    tr = [r for r in rows if "rollout/trunc_rate" in r]
    ev = [r for r in rows if "eval/accuracy" in r]
    acc = [r["eval/accuracy"] for r in ev]
    peak = max(acc)
    takeoff = first_step(tr, "rollout/trunc_rate", TAKEOFF)
    quiet_until = first_step(tr, "rollout/trunc_rate", QUIET)
    quiet_until = math.inf if quiet_until == "" else quiet_until        # the first loud step
    learned = any(a - acc[0] >= LEARNED - 1e-9 and r["step"] <= quiet_until
                  for a, r in zip(acc, ev))
    collapsed = takeoff != "" and max(r["rollout/trunc_rate"] for r in tr) >= COLLAPSE_TRUNC \
        and peak - acc[-1] >= COLLAPSE_DROP - 1e-9
    after = [r["rollout/trunc_rate"] >= TAKEOFF for r in tr
             if takeoff != "" and r["step"] >= takeoff]
    persisted = bool(after) and sum(after) > len(after) / 2
    if collapsed:
        verdict = ("learned, then collapsed" if learned else "collapsed before learning") + \
            ("" if persisted else ", partly recovered")
    elif takeoff != "":
        verdict = "learned, inflated, kept its accuracy" if learned else "inflated, did not learn"
    else:
        verdict = "learned, no collapse" if learned else "did not learn, no collapse"
    return {"learned": learned, "collapsed": collapsed, "persisted": persisted, "verdict": verdict}


def summarize(method, seed, rows) -> dict:
    """opd.summarize()'s row with the figures the reports need, and shape()'s verdict."""
    tr = [r for r in rows if "rollout/trunc_rate" in r]
    alert = next((r["step"] for r in tr if any(k.startswith("alert/") for k in r)), "")
    quiet = opd.first_step(tr, "rollout/trunc_rate", QUIET)      # steps before truncation > 0.05
    row = opd.summarize(method, seed, rows)
    guard, takeoff = row["guard_step"], row["takeoff_step"]
    return {**row, "quiet_steps": quiet if quiet != "" else len(tr),
            "trunc_rate_step0": tr[0]["rollout/trunc_rate"],
            "trunc_rate_final": tr[-1]["rollout/trunc_rate"],
            "len_mean_step0": tr[0]["rollout/len_mean"],
            "len_mean_final": tr[-1]["rollout/len_mean"],
            "rep_rate_step0": tr[0]["rollout/rep_rate"],
            "rep_rate_final": tr[-1]["rollout/rep_rate"],
            "first_alert_step": alert,
            "alert_lead": takeoff - alert if takeoff != "" and alert != "" else "",
            "trunc_after_guard": max((r["rollout/trunc_rate"] for r in tr if r["step"] > guard),
                                     default="") if guard != "" else "",
            **{k: {True: "yes", False: "no"}.get(v, v) for k, v in shape(rows).items()}}


def runs_table(rows, label=None) -> str:
    """One line per run: the learning phase, the collapse, and shape()'s verdict. A run cut
    before its final evaluation says so; its final accuracy is then its last evaluation's."""
    label = label or (lambda r: f"{r['method']}, seed {r['seed']}")
    return markdown(["run", "steps", "steps with truncation <= 0.05",
                     "accuracy step 0 -> peak (step)", "take-off", "worst truncation",
                     "repetition step 0 -> worst", "final accuracy", "verdict"],
                    [[label(r), r["steps"] if r["finished"] == "yes" else f"{r['steps']} (cut)",
                      r["quiet_steps"],
                      f"{r['acc_step0']:.2f} -> {r['acc_peak']:.2f} ({r['acc_peak_step']})",
                      r["takeoff_step"] if r["takeoff_step"] != "" else "none",
                      f"{r['trunc_rate_max']:.2f}",
                      f"{r['rep_rate_step0']:.2f} -> {r['rep_rate_max']:.2f}",
                      f"{r['acc_final']:.2f}", r["verdict"]] for r in rows])


def time_table(results) -> str:
    """Where each run's time went: seconds in each phase, summed over its steps (time/*), and the
    median seconds of a training step (rollout, teacher and update) and of an evaluation."""
    phases = ("rollout", "teacher", "update", "eval")
    lines = []
    for m, seed, rows in results:
        spent = [sum(r.get(f"time/{k}_s", 0.0) for r in rows) for k in phases]
        steps = [sum(r[f"time/{k}_s"] for k in phases[:3]) for r in rows if "time/update_s" in r]
        evals = [r["time/eval_s"] for r in rows if "time/eval_s" in r]
        lines.append([f"{m}, seed {seed}", *[f"{x:.0f} s" for x in spent], f"{sum(spent):.0f} s",
                      f"{statistics.median(steps):.1f} s", f"{statistics.median(evals):.1f} s"])
    return markdown(["run", "rollout", "teacher forward", "student forward, loss, backward",
                     "held-out evaluation", "sum", "a step (median)", "an evaluation (median)"],
                    lines)


def run_folders(folders):
    """(label, method, seed, rows) of each run folder given (a folder of run folders is opened)."""
    out = []
    for f in map(Path, folders):
        for d in ([f] if (f / "metrics.jsonl").exists() else sorted(f.glob("*-s*"))):
            rows = read_metrics(d / "metrics.jsonl") if (d / "metrics.jsonl").exists() else []
            if any("eval/accuracy" in r for r in rows):           # a run that has begun
                method, seed = d.name.rsplit("-s", 1)
                out.append((str(d), method, int(seed), rows))
    if not out:
        opd.fail(f"no run folder (with a metrics.jsonl) in {', '.join(map(str, folders))}")
    return out


def write(out, rows, parts, command):
    """OUT/results.md and results.csv, the command that wrote them named at the top."""
    opd.write_results(rows, Path(out), parts, f"`{command}`")


# =============================================================================
# Every fix compared: the ranking and the fixes that act too late
# =============================================================================

def needs_gold(method: str) -> bool:
    """Whether a preset trains on reference solutions: an SFT term, or the guard's Stable-OPD."""
    preset = METHODS[method]
    fix = preset.get("guard_fix", "auto")          # 'auto' is Stable-OPD on the toy task's data
    return preset.get("sft_coef", 0) > 0 or (preset.get("guard", False) and fix != "seq-kd")


def held(rows, results) -> dict:
    """Per run (method, seed): whether the fix held, as tutorial section 5 asks of a fix: the
    rollouts' truncation at most 0.1 on every step and a final accuracy at or above plain OPD's
    mean peak (None without plain OPD runs)."""
    opd_peaks = [r["acc_peak"] for r in rows if r["method"] == "opd"]
    bar = sum(opd_peaks) / len(opd_peaks) if opd_peaks else None
    by_run = {(m, s): rs for m, s, rs in results}
    out = {}
    for r in rows:
        trunc = max(x["rollout/trunc_rate"] for x in by_run[(r["method"], r["seed"])]
                    if "rollout/trunc_rate" in x)
        ok = None if bar is None else trunc <= 0.1 and r["acc_final"] >= bar - 1e-9
        out[(r["method"], r["seed"])] = ok
    return out


def measure_cost(base: Config, methods, steps: int = 25) -> dict:
    """Seconds per training step of each method, one after the other in this process on seed 0
    (median of steps 5 to `steps` - 1, before any run inflates): what each method's extra
    terms cost, measured under the same conditions, without the noise of parallel runs."""
    out = {}
    for m in [methods[0], *methods]:      # the first run warms the process up and is measured again
        cfg = with_settings(config_for(base, m, base.seed), steps=steps, eval_every=10**6,
                            save_every=0, out_dir=str(Path(base.out_dir) / "cost"), log_every=10**6,
                            log_samples_every=0, run_name=m)
        rows = [r for r in run_opd(cfg, m) if "time/update_s" in r and r["step"] >= 5]
        out[m] = statistics.median(sum(r[f"time/{k}_s"] for k in ("rollout", "teacher", "update"))
                                   for r in rows)
    return out


def ranking_table(rows, results, cost: dict) -> str:
    """Every method, worst seed first: what it needs, what it costs, how it ended."""
    ok = held(rows, results)
    lines = []
    for m in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == m]
        finals = [r["acc_final"] for r in rs]
        cost_ratio = cost[m] / cost["opd"]
        n_held = sum(bool(ok[(m, r["seed"])]) for r in rs)
        lines.append((min(finals), [m, "yes" if m in METHODS and needs_gold(m) else "no",
                                    f"{cost_ratio:.2f}", f"{sum(finals) / len(finals):.2f}",
                                    f"{min(finals):.2f}", f"{max(finals):.2f}",
                                    f"{sum(r['takeoff_step'] != '' for r in rs)}/{len(rs)}",
                                    f"{max(r['trunc_rate_max'] for r in rs):.2f}",
                                    f"{n_held}/{len(rs)}"]))
    lines = [x for _, x in sorted(lines, key=lambda t: -t[0])]
    return markdown(["method", "needs gold data", "cost per step (plain OPD = 1)",
                     "final accuracy, mean", "worst seed", "best seed", "seeds that took off",
                     "worst truncation", "seeds that held"], lines)


def divergence_table(results, methods=("drop-trunc", "overlong")) -> str:
    """Fixes that act only on rollouts near the budget, against plain OPD on the same seed: the
    first step whose loss differs from plain OPD's (until then the two runs are one run), the
    first step with a truncated rollout, and each run's take-off."""
    plain = {s: rows for m, s, rows in results if m == "opd"}
    lines = []
    for m, seed, rows in results:
        if m not in methods or seed not in plain:
            continue
        a = {r["step"]: r["loss/total"] for r in plain[seed] if "loss/total" in r}
        b = [r for r in rows if "loss/total" in r]
        split = next((r["step"] for r in b if a.get(r["step"]) != r["loss/total"]), "never")
        steps = [first_step(b, "rollout/trunc_rate", 0),                   # '' where none
                 first_step(b, "rollout/trunc_rate", TAKEOFF),
                 first_step(plain[seed], "rollout/trunc_rate", TAKEOFF)]
        lines.append([f"{m}, seed {seed}", split, *[x if x != "" else "none" for x in steps]])
    return markdown(["run", "first step whose loss differs from plain OPD's",
                     "first truncated rollout", "take-off", "plain OPD's take-off"], lines)


GROUPS = {True: ("needs gold data", "#0072B2"), False: ("needs none", "#E69F00")}


def plot_ranking(rows, out: Path):
    """Each method's final held-out accuracy, a dot per seed, in the ranking table's order (the
    worst seed first; best at the top), coloured by whether the fix needs gold data, with plain
    OPD's mean peak and step 0 as lines. The right panel zooms on the methods whose worst seed
    ended above plain OPD's mean peak less 0.05, where the best fixes' seeds would crowd."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    finals = {}
    for r in rows:
        finals.setdefault(r["method"], []).append(r["acc_final"])
    methods = sorted(finals, key=lambda m: -min(finals[m]))           # ranking_table's order
    peak = statistics.mean(r["acc_peak"] for r in rows if r["method"] == "opd")
    step0 = statistics.mean(r["acc_step0"] for r in rows)
    top = [m for m in methods if min(finals[m]) >= peak - 0.05]
    fig, axes = plt.subplots(1, 2, figsize=(8, 0.3 * len(methods) + 1.6), width_ratios=[2, 1])
    for ax, shown in zip(axes, (methods, top)):
        for y, m in enumerate(reversed(shown)):
            color = GROUPS[needs_gold(m) if m in opd.METHODS else False][1]
            ax.plot([min(finals[m]), max(finals[m])], [y, y], color=color, lw=1, zorder=2)
            ax.scatter(finals[m], [y] * len(finals[m]), s=30, zorder=3, color=color,
                       edgecolors="white", linewidths=0.5)
        ax.set_yticks(range(len(shown)), list(reversed(shown)))
        ax.axvline(peak, color="black", ls=":", lw=1.2, label=f"plain OPD's mean peak ({peak:.2f})")
        ax.grid(axis="x", alpha=0.3)
    axes[0].axvline(step0, color="gray", ls="--", lw=1, label=f"step 0 ({step0:.2f})")
    for gold, (name, color) in GROUPS.items():
        axes[0].scatter([], [], color=color, label=name)
    axes[0].set(xlim=(-0.02, 1.0), xlabel="final held-out accuracy, a dot per seed")
    lo = min(min(finals[m]) for m in top)
    axes[1].set(xlim=(min(lo, peak) - 0.02, max(max(v) for v in finals.values()) + 0.02),
                xlabel="the best, zoomed")
    axes[0].legend(loc="lower right", fontsize=8)
    n = max(len(v) for v in finals.values())
    fig.suptitle(f"Which fix to use: {n} seeds each, the worst seed first (best at the top)",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(out / "ranking.png", dpi=100)
    plt.close(fig)


def report_ranking(out):
    """ranking.png again from OUT/results.csv alone (a committed comparison, no run folders)."""
    with open(Path(out) / "results.csv") as f:
        rows = [{**r, **{k: float(r[k]) for k in ("acc_step0", "acc_peak", "acc_final")}}
                for r in csv.DictReader(f)]
    plot_ranking(rows, Path(out))


def compare(argv):
    """Every preset (or --methods) on --seeds seeds through opd.py's study, then the summary,
    the runs with their verdicts, the ranking (cost measured after the runs, in this process)
    and the late fixes, into OUT with the ranking's figure."""
    out, argv = Path(argv[0]), argv[1:]
    base, study, given = opd.parse_config(argv)
    if "methods" not in given:
        study = opd.Study(**{**vars(study), "methods": "all"})
    if "seeds" not in given:
        study = opd.Study(**{**vars(study), "seeds": 5})
    results = opd.run_all(base, study, given)
    rows = [summarize(m, s, r) for m, s, r in results]
    out.mkdir(parents=True, exist_ok=True)
    costs = out / "cost.json"                        # measured once, after the runs
    methods = list(dict.fromkeys(m for m, _ in opd.study_runs(study, base)))
    costs.write_text(json.dumps(measure_cost(base, methods), indent=1))
    write(out, rows, {"summary": opd.summary_table(rows), "runs": runs_table(rows),
                      "ranking": ranking_table(rows, results, json.loads(costs.read_text())),
                      "late-fixes": divergence_table(results)},
          " ".join(["python studies/study.py compare", str(out), *argv]))
    plot_ranking(rows, out)


# =============================================================================
# Reports over run folders
# =============================================================================

def _window(rows, key, lo, hi):
    """The finite values of `key` on training steps lo <= step < hi."""
    return [r[key] for r in rows if "rollout/trunc_rate" in r and lo <= r["step"] < hi
            and key in r and r[key] == r[key]]


def phase_table(results) -> str:
    """The monitor's figures on plain OPD before and after its collapse: per key, the range over
    seeds of each seed's mean over the healthy steps (60 up to 10 before the take-off) and over
    the collapsed ones (from 10 after the take-off to the end)."""
    runs = [(s, rows, first_step(rows, "rollout/trunc_rate", TAKEOFF)) for m, s, rows in results
            if m == "opd"]
    runs = [(s, rows, t) for s, rows, t in runs if t != ""]
    keys = ["rollout/len_mean", "rollout/trunc_rate", "rollout/rep_rate", "rollout/ngram_rep",
            "rollout/accuracy", "logp/student", "logp/teacher", "kl/reverse", "adv/repetitive_frac",
            "eos/p_student", "eos/p_teacher", "eos/teacher_lower_frac"]

    def span(key, lo, hi):
        means = [_mean(_window(rows, key, lo(t), hi(t, rows))) for _, rows, t in runs]
        means = [x for x in means if x == x]
        return f"{min(means):.2f} to {max(means):.2f}" if means else "no value"
    end = (lambda t, rows: rows[-1]["step"] + 1)
    lines = [[f"`{k}`", span(k, lambda t: 60, lambda t, rows: t - 10),
              span(k, lambda t: t + 10, end)] for k in keys]
    return markdown(["key", "healthy: steps 60 to 10 before the take-off",
                     "collapsed: 10 steps after the take-off to the end"], lines)


def mechanism_table(results) -> str:
    """Plain OPD, per seed: the KL and the teacher's log-prob before the drift and just before
    the take-off, the advantage of tokens in a repetitive tail against the others once the
    loops set in, and when the repetitive ones first get the larger advantage."""
    lines = []
    for m, seed, rows in results:
        t = first_step(rows, "rollout/trunc_rate", TAKEOFF)
        if m != "opd" or t == "":
            continue
        end = rows[-1]["step"] + 1
        tr = [r for r in rows if "rollout/trunc_rate" in r]
        above = [r["step"] for r in tr if r.get("adv/repetitive", math.nan) > r["adv/regular"]]
        good = next((s for s in above if all(x in above for x in range(s, min(s + 20, end)))), "")
        lines.append([seed, t, f"{_mean(_window(rows, 'kl/reverse', 60, t - 10)):.2f}",
                      f"{_mean(_window(rows, 'kl/reverse', t - 10, t)):.2f}",
                      f"{_mean(_window(rows, 'logp/teacher', 60, t - 10)):.2f}",
                      f"{_mean(_window(rows, 'logp/teacher', t - 10, t)):.2f}",
                      f"{_mean(_window(rows, 'adv/repetitive', end - 40, end)):.2f} against "
                      f"{_mean(_window(rows, 'adv/regular', end - 40, end)):.2f}",
                      sum(r["rollout/rep_rate"] > 0 for r in tr if r["step"] < t),
                      above[0] if above else "never", good or "never",
                      f"{_mean(_window(rows, 'eos/teacher_lower_frac', 60, t)):.2f}"])
    return markdown(["seed", "take-off", "KL, steps 60 to take-off - 10", "KL, the 10 steps before",
                     "teacher log-prob, steps 60 to take-off - 10", "the 10 steps before",
                     "advantage, repetitive tail against the rest, last 40 steps",
                     "steps with a looping rollout before the take-off",
                     "repetitive first above the rest", "above for 20 steps in a row from",
                     "stops with p_T(EOS) < p_S(EOS), step 60 to take-off"], lines)


def position_table(results, lo: int = 0, hi: int = 10) -> str:
    """Where in the response the teacher agrees, per method: the mean over its runs and over the
    training steps lo <= step < hi of each position bin's advantage, share of positive advantage
    and teacher log-prob (position_profile(), logged as pos/*)."""
    bins = [f"{a}-{b - 1}" for a, b in zip(POSITION_BINS, POSITION_BINS[1:])] + \
        [f"{POSITION_BINS[-1]}+"]
    names = {"pos/adv": "mean A_t", "pos/adv_positive": "share of tokens with A_t > 0",
             "pos/logp_teacher": "teacher log-prob"}
    lines = []
    for m in dict.fromkeys(m for m, _, _ in results):
        steps = [r for mm, _, rows in results if mm == m for r in rows
                 if "pos/adv" in r and lo <= r["step"] < hi]
        for key, name in names.items():
            cols = [[r[key][i] for r in steps if r[key][i] == r[key][i]] for i in range(len(bins))]
            lines.append([m, name, *[f"{_mean(c):.2f}" if c else "" for c in cols]])
    return markdown(["run", "figure", *[f"tokens {b}" for b in bins]], lines)


def evals_table(runs) -> str:
    """Short runs, one line each: the held-out accuracy (greedy, then sampled) and greedy length
    at every evaluation, and the training rollouts' mean length and truncation over the first 5
    steps and the last 10."""
    lines = []
    for label, _, _, rows in runs:
        ev = [r for r in rows if "eval/accuracy" in r]
        tr = [r for r in rows if "rollout/trunc_rate" in r]

        def change(key, digits):
            first, last = _mean([r[key] for r in tr[:5]]), _mean([r[key] for r in tr[-10:]])
            return f"{first:.{digits}f} -> {last:.{digits}f}"
        lines.append([label, ", ".join(str(r["step"]) for r in ev),
                      ", ".join(f"{r['eval/accuracy']:.2f}" for r in ev),
                      ", ".join(f"{r['eval/accuracy_sampled']:.2f}" for r in ev),
                      ", ".join(f"{r['eval/len_mean']:.0f}" for r in ev),
                      change("rollout/len_mean", 1), change("rollout/trunc_rate", 2)])
    return markdown(["run", "evaluated at steps", "held-out accuracy, greedy",
                     "held-out accuracy, sampled", "held-out greedy length",
                     "rollout length, first 5 steps -> last 10",
                     "truncation, first 5 steps -> last 10"], lines)


def stops_table(results, lo: int = 0, hi: int = 10) -> str:
    """Per method, the mean over its runs and the training steps lo <= step < hi of the
    rollouts' length and truncation, the EOS probabilities where they stopped, and the
    advantage: does the teacher push against stopping?"""
    keys = ["rollout/len_mean", "rollout/trunc_rate", "eos/p_student", "eos/p_teacher",
            "eos/teacher_lower_frac", "adv/mean"]
    lines = []
    for m in dict.fromkeys(m for m, _, _ in results):
        steps = [r for mm, _, rows in results if mm == m for r in rows
                 if "rollout/trunc_rate" in r and lo <= r["step"] < hi]
        lines.append([m, *[f"{_mean([r[k] for r in steps if r.get(k) == r.get(k)]):.2f}"
                           for k in keys]])
    return markdown(["run", "rollout length", "truncation", "p_S(EOS) at the stops",
                     "p_T(EOS) at the stops", "stops with p_T < p_S", "mean A_t"], lines)


def fire_step(steps, values, threshold: float, patience: int = 2, start: int = 10):
    """First step at which `values` exceeded `threshold` `patience` steps in a row ('' if never)."""
    run = 0
    for step, v in zip(steps, values):
        run = run + 1 if step >= start and v > threshold else 0
        if run >= patience:
            return step
    return ""


def alert_table(runs, thresholds=(0.2, 0.3, 0.4, 0.5), patience: int = 2) -> str:
    """The step at which the monitor's truncation alert would have fired on each run, for other
    --alert-trunc thresholds (and --alert-patience 2), from the logged truncation rates: which
    threshold stays quiet on a control and fires on the runs that inflate."""
    lines = []
    for label, _, _, rows in runs:
        tr = [r for r in rows if "rollout/trunc_rate" in r]
        steps, trunc = [r["step"] for r in tr], [r["rollout/trunc_rate"] for r in tr]
        lines.append([label, *[fire_step(steps, trunc, t, patience, start=0) for t in thresholds]])
    return markdown(["run", *[f"`--alert-trunc {t}`" for t in thresholds]],
                    [[c if c != "" else "never" for c in line] for line in lines])


def report_runs(out, *folders):
    """A line per run folder, labelled by its path, and the mean over runs per method; the
    evaluations of short runs, the per-position terms and the stops; and opd.plot_runs()'s figure
    (truncation as the mean of 5 steps), a row per folder of runs."""
    runs = run_folders(folders)
    rows = [dict(summarize(m, s, r), run=label) for label, m, s, r in runs]
    parts = {"runs": runs_table(rows, label=lambda r: r["run"]),
             "summary": opd.summary_table(rows, group=lambda r: r["run"].rsplit("-s", 1)[0])}
    loud = [r["run"] for r in rows if r["trunc_rate_step0"] > QUIET]
    if loud:        # shape() cannot call these learned: say so under the table, not in each verdict
        parts["runs"] += (f"\n\n{len(loud)} of {len(rows)} runs truncate more than {QUIET} of "
                          f"their rollouts at step 0, so shape() cannot count them as learned (it "
                          f"needs truncation <= {QUIET} before the peak, a threshold set on the "
                          f"toy pair): read their evaluations instead.")
    if max(sum("eval/accuracy" in x for x in r) for *_, r in runs) <= 6:      # short runs
        parts["evals"] = evals_table(runs)
    if all(any("pos/adv" in x for x in r) for *_, r in runs):
        labelled = [(label.rsplit("-s", 1)[0], s, r) for label, _, s, r in runs]
        last = min(max(x["step"] for x in r if "rollout/trunc_rate" in x) for *_, r in runs)
        parts["positions"] = position_table(labelled)                     # the first 10 steps
        parts["positions-late"] = position_table(labelled, last - 9, last + 1)
        parts["stops"] = stops_table(labelled)
        parts["stops-late"] = stops_table(labelled, last - 9, last + 1)
    parts["alerts"] = alert_table(runs)
    parts["time"] = time_table([(label.rsplit("-s", 1)[0], s, r) for label, _, s, r in runs])
    write(out, rows, parts, f"python studies/study.py runs {out} {' '.join(folders)}")
    parents = {}                # a method found in one folder keeps its name; else its folder's
    for label, m, _, _ in runs:
        parents.setdefault(m, set()).add(Path(label).parent.name)
    groups = [m if len(parents[m]) == 1 else Path(label).parent.name for label, m, _, _ in runs]
    count = {g: groups.count(g) for g in groups}
    opd.plot_runs([(g, s, r) for g, (_, _, s, r) in zip(groups, runs)],
                  Path(out) / "fig1_accuracy_length.png", smooth=5,
                  title="seeds: " + ", ".join(f"{g} {n}" for g, n in count.items()),
                  colors={"plain": opd.COLORS["opd"]})


def report_collapse(out, folder):
    """Plain OPD before and after its collapse (phases) and the paper's mechanism, seed by seed,
    from the default study's run folder (runs/)."""
    runs = [(m, s, r) for _, m, s, r in run_folders([folder])]
    rows = [summarize(m, s, r) for m, s, r in runs]
    write(out, rows, {"runs": runs_table(rows), "phases": phase_table(runs),
                      "mechanism": mechanism_table(runs), "time": time_table(runs)},
          f"python studies/study.py collapse {out} {folder}")


# Which signal warns first? Each candidate is one number per training step, computed from a
# run's logged metrics; signal_table() scores them against the take-off.

def _slope(xs, i, n=10):
    """Least-squares slope per step of the last n values up to xs[i] (0 before there are n)."""
    if i + 1 < n or any(x != x for x in xs[i + 1 - n:i + 1]):
        return 0.0
    w, mid = xs[i + 1 - n:i + 1], (n - 1) / 2
    return sum((j - mid) * (x - sum(w) / n) for j, x in enumerate(w)) / \
        sum((j - mid) ** 2 for j in range(n))


def warning_signals(rows) -> dict:
    """Candidate early warnings of the collapse, each a list with one value per training step."""
    rows = [r for r in rows if "rollout/trunc_rate" in r]

    def col(k):
        return [float(r.get(k, math.nan)) for r in rows]

    ngram, ema = col("rollout/ngram_rep"), []
    for x in ngram:
        ema.append(x if not ema else 0.9 * ema[-1] + 0.1 * x)
    frac, logp_t = col("adv/repetitive_frac"), col("logp/teacher")
    gap = [a - b if a == a else -math.inf
           for a, b in zip(col("adv/repetitive"), col("adv/regular"))]
    return {"steps": [r["step"] for r in rows],
            "repetition rate": col("rollout/rep_rate"),
            "3-gram repetition over its EMA": [x - e for x, e in zip(ngram, [ngram[0]] + ema[:-1])],
            "repetitive-token share, slope": [_slope(frac, i) for i in range(len(rows))],
            "advantage gap, repetitive - regular": gap,
            "share of stops with p_T(EOS) < p_S(EOS)": col("eos/teacher_lower_frac"),
            "length over its EMA": col("rollout/growth"),
            "p90 length": col("rollout/len_p90"),
            "teacher log-prob, falling slope": [-_slope(logp_t, i) for i in range(len(rows))]}


def signal_table(*folders, fit_seeds=(0, 1, 2), horizon: int = 50) -> str:
    """Lead time and false alarms of every candidate signal, as a markdown table.

    Runs: the opd, stable-opd and sft-only runs in `folders`; a run collapses if its truncation
    rate exceeds TAKEOFF. A lead is the take-off step minus the alert's step; a false alarm, an
    alert on a run that never takes off. Each signal's threshold is chosen on the seeds in
    `fit_seeds` alone, among those with no false alarm and no alert more than `horizon` steps
    ahead of a take-off (such an alert says nothing about the collapse): the largest whose
    smallest lead is at least 10 steps (twice the 5 an alarm needs to be acted on), else the one
    with the largest smallest lead. The other seeds are only scored.
    """
    runs = []
    for d in sorted(p for f in folders for p in Path(f).glob("*-s*")):
        method, seed = d.name.rsplit("-s", 1)
        if method in ("opd", "stable-opd", "sft-only") and (d / "metrics.jsonl").exists():
            rows = read_metrics(d / "metrics.jsonl")
            tr = [r for r in rows if "rollout/trunc_rate" in r]
            runs.append((int(seed) in fit_seeds, first_step(tr, "rollout/trunc_rate", TAKEOFF),
                         warning_signals(rows)))

    def score(name, thr, fit):    # leads on collapsing runs (None: never fired), false alarms
        leads, false = [], 0
        for is_fit, takeoff, sig in runs:
            if is_fit == fit:
                fired = fire_step(sig["steps"], sig[name], thr)
                if takeoff == "":
                    false += fired != ""
                else:
                    leads.append(takeoff - fired if fired != "" else None)
        return leads, false

    def fmt(leads):
        return ", ".join("missed" if x is None else str(x) for x in leads)

    lines = []
    n_quiet = {fit: sum(t == "" for f, t, _ in runs if f == fit) for fit in (True, False)}
    for name in [k for k in runs[0][2] if k != "steps"]:
        seen = sorted({v for f, _, sig in runs if f for v in sig[name] if math.isfinite(v)})
        ok = []                             # (threshold, smallest lead on the fit seeds)
        between = [(a + b) / 2 for a, b in zip(seen, seen[1:])]
        for thr in between[::max(1, len(seen) // 400)]:
            leads, false = score(name, thr, True)
            if false == 0 and all(x is None or x <= horizon for x in leads):
                worst = min((x if x is not None else -math.inf for x in leads), default=-math.inf)
                ok.append((thr, worst))
        enough = [x for x in ok if x[1] >= 10]
        best = enough[-1] if enough else max(ok, key=lambda x: x[1], default=None)
        if best is None:
            lines.append([name, "none without a false alarm", "", "", "", ""])
            continue
        (lf, ff), (lh, fh) = score(name, best[0], True), score(name, best[0], False)
        lines.append([name, f"{best[0]:.3g}", fmt(lf), f"{ff} of {n_quiet[True]} quiet", fmt(lh),
                      f"{fh} of {n_quiet[False]} quiet"])
    return markdown(["signal", "threshold (chosen on the fit seeds)", "lead, fit seeds",
                     "false alarms, fit", "lead, held-out seeds", "false alarms, held-out"], lines)


def report_signals(out, *folders):
    """signal_table() over the run folders given."""
    write(out, [{"folders": " ".join(folders)}], {"signals": signal_table(*folders)},
          f"python studies/study.py signals {out} {' '.join(folders)}")


WEAK_ACCURACY = 0.85     # report_builds: a teacher below this held-out accuracy is weak,
WEAK_LOOP_EOS = 0.02     # and so is one whose p(EOS) two repeats into a loop is above this


def report_builds(out, *folders):
    """One line per independent build of the pair: its teacher and student (their build.json) and
    the runs on it. Each folder holds one build's runs (opd-s0, opd-s1, stable-opd-s0); the pair
    is the --teacher and --student of their config.json (none: the shipped pair)."""
    lines, rows = [], []
    for f in map(Path, folders):
        runs = {d.name: read_metrics(d / "metrics.jsonl") for d in sorted(f.glob("*-s*"))
                if (d / "metrics.jsonl").exists()}
        cfg = json.loads(next(f.glob("*-s*/config.json")).read_text())
        info = {role: json.loads((Path(cfg[role] or opd.PAIR / role) / "build.json").read_text())
                for role in ("teacher", "student")}
        cfg["pair_seed"] = info["teacher"]["settings"]["pair_seed"]
        t, p = info["teacher"], info["teacher"]["p_eos_by_depth"]
        cells = []
        for name in ("opd-s0", "opd-s1"):
            r = summarize("opd", int(name[-1]), runs[name])
            rows.append(dict(r, pair_seed=cfg["pair_seed"]))
            cells.append(f"{r['acc_step0']:.2f} -> {r['acc_peak']:.2f}, "
                         f"{r['takeoff_step'] if r['takeoff_step'] != '' else 'none'}, "
                         f"{r['acc_final']:.2f}: {r['verdict']}")
        st = summarize("stable-opd", 0, runs["stable-opd-s0"])
        rows.append(dict(st, pair_seed=cfg["pair_seed"]))
        lines.append([cfg["pair_seed"], f"{t['accuracy']:.2f}, {p['0']:.2f}, {p['1']:.2f}, "
                      f"{p['2']:.2f}", f"{info['student']['accuracy']:.2f}", *cells,
                      f"{st['trunc_rate_max']:.2f}, {st['acc_final']:.2f}"])
    table = opd.markdown(["build (`--pair-seed`)", "teacher: accuracy, p(EOS) at d = 0, 1, 2",
                      "student accuracy", "plain OPD seed 0: step 0 -> peak, take-off, final: "
                      "verdict", "seed 1", "`stable-opd` seed 0: worst truncation, final"], lines)
    teachers = [r[1].split(", ") for r in lines]                          # accuracy, d = 0, 1, 2
    weak = sum(float(a) < WEAK_ACCURACY or float(d2) > WEAK_LOOP_EOS for a, _, _, d2 in teachers)
    plain = [r for r in rows if r["method"] == "opd"]
    stable = [r for r in rows if r["method"] == "stable-opd"]
    peak = {r["pair_seed"]: max(x["acc_peak"] for x in plain if x["pair_seed"] == r["pair_seed"])
            for r in stable}
    verdicts = dict.fromkeys(r["verdict"] for r in plain)
    held_ = (sum(r["trunc_rate_max"] <= 0.1 for r in stable),
             sum(r["acc_final"] > peak[r["pair_seed"]] for r in stable))
    rate = opd.markdown(["builds", f"weak teachers (accuracy < {WEAK_ACCURACY}, or p(EOS) two "
                         f"repeats deep > {WEAK_LOOP_EOS})", "plain OPD runs, by verdict",
                     "`stable-opd`: truncation at most 0.1; final above the build's plain peak"],
                    [[len(lines), f"{weak} of {len(lines)}",
                      "; ".join(f"{v}: {sum(r['verdict'] == v for r in plain)} of {len(plain)}"
                                for v in verdicts),
                      f"{held_[0]} of {len(stable)}; {held_[1]} of {len(stable)}"]])
    depths = range(-1, 6)
    shipped = {role: json.loads((opd.PAIR / role / "build.json").read_text())["p_eos_by_depth"]
               for role in ("teacher", "student")}
    profile = opd.markdown(["`d`, repeats past the asked count", *[str(d) for d in depths]],
                       [[f"{role} `p(EOS)`", *[f"{p[str(d)]:.3f}" for d in depths]]
                        for role, p in shipped.items()])
    write(out, rows, {"builds": table, "rate": rate, "shipped-pair": profile},
          f"python studies/study.py builds {out} {' '.join(folders)}")


def _loss_memory(vocab, batch, length, hidden, chunk, objective):
    """loss_peak_memory()'s measurement; it runs in a process of its own and prints its result."""
    def peak_mb(reset=False):      # Linux's VmHWM; reset: start afresh from the memory in use
        if reset:
            Path("/proc/self/clear_refs").write_text("5")
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024
    torch.manual_seed(0)
    hs = torch.randn(batch, length, hidden, requires_grad=True)                # (B, T, H)
    ht = torch.randn(batch, length, hidden)                                    # (B, T, H)
    head_s = torch.nn.Linear(hidden, vocab, bias=False)
    head_t = torch.nn.Linear(hidden, vocab, bias=False).requires_grad_(False)
    y = torch.randint(0, vocab, (batch, length))                               # (B, T)
    base = peak_mb(reset=True)
    t = opd.token_terms(hs, head_s, ht, head_t, y, 0, 1.0, chunk, objective)
    loss = (t.kl if objective != "sampled" else -t.logp_student).mean()
    loss.backward()
    print(json.dumps({"loss_mb": peak_mb() - base, "loss": float(loss)}))


def loss_peak_memory(vocab=152_000, batch=4, length=1024, hidden=256, chunk=0,
                     objective="full") -> dict:
    """Peak resident memory (MB) of one loss and its backward on random hidden states, above the
    inputs and the two vocabulary heads, measured in a fresh process (Linux: VmHWM)."""
    args = json.dumps([vocab, batch, length, hidden, chunk, objective])
    # glibc keeps freed blocks below its mmap threshold for reuse, so the peak would count
    # chunks already freed; a low threshold returns each tensor's memory as it is freed
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    code = "import json, sys, study; study._loss_memory(*json.loads(sys.argv[1]))"
    out = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parent, env=env)
    return json.loads(out.stdout.splitlines()[-1])


def report_memory(out):
    """The memory of the chunked loss against the unchunked one, at a real vocabulary's size.
    Needs about 13 GB of memory free."""
    kw = dict(vocab=152_000, batch=4, length=1024, hidden=256)
    lines = []
    names = {"full": "full-vocabulary KL", "sampled": "sampled-token (log-prob of the sampled ids)"}
    for objective, name in names.items():
        whole, chunked = (loss_peak_memory(**kw, chunk=c, objective=objective) for c in (0, 64))
        same = abs(whole["loss"] - chunked["loss"]) <= 1e-5 * abs(whole["loss"])
        lines.append([name, f"{whole['loss_mb']:,.0f} MB", f"{chunked['loss_mb']:,.0f} MB",
                      f"{chunked['loss_mb'] / whole['loss_mb']:.2f}", "yes" if same else "no"])
    header = ["loss", "unchunked (`chunk=0`)", "chunked (`chunk=64`)", "ratio", "same loss"]
    write(out, [dict(zip(header, line)) for line in lines], {"memory": opd.markdown(header, lines)},
          f"python studies/study.py memory {out}")


REPORTS = {"runs": report_runs, "collapse": report_collapse, "signals": report_signals,
           "builds": report_builds, "memory": report_memory, "ranking": report_ranking}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare"] and len(argv) > 1:
        return compare(argv[1:])
    counts = {"collapse": (3, 3), "memory": (2, 2), "ranking": (2, 2)}
    lo, hi = counts.get(argv[0], (3, math.inf)) if argv and argv[0] in REPORTS else (1, 0)
    if not lo <= len(argv) <= hi:
        opd.fail("usage: python studies/study.py compare OUT [opd.py flags] | runs|signals|builds "
                 "OUT FOLDER... | collapse OUT FOLDER | memory|ranking OUT (see its docstring)")
    return REPORTS[argv[0]](*argv[1:])


if __name__ == "__main__":
    main()
