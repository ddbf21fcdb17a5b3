"""mokd-bench science's analysis: per network and mode the final k-NN's mean ± std over seeds, MOKD's
gain over independent training with its standard error, each loss term's share of the gradient at the
backbone over training (when the runs measured it), the console table and the plot."""
from __future__ import annotations

import math
import statistics
import typing
from pathlib import Path

from mokd_scale.config.schema import MokdConfig

MODES = typing.get_args(typing.get_type_hints(MokdConfig)["mode"])  # ("mokd", "independent")


def mean_std(values: list[float]) -> dict:
    return {"n": len(values), "mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None, "values": values}


def gain(mokd: dict, independent: dict, paired: list[float]) -> dict:
    """MOKD − independent: difference of means, its standard error, and a plain-words verdict
    (a gain more than two standard errors from 0 counts as a difference)."""
    if not mokd["n"] or not independent["n"]:
        return {"mean": None, "se": None, "paired_differences": paired, "verdict": "not measured"}
    difference = mokd["mean"] - independent["mean"]
    if mokd["std"] is None or independent["std"] is None:
        se = None
    else:
        se = math.sqrt(mokd["std"] ** 2 / mokd["n"] + independent["std"] ** 2 / independent["n"])
    if se is None:
        verdict = "one seed: no uncertainty"
    elif difference > 2 * se:
        verdict = "MOKD better"
    elif difference < -2 * se:
        verdict = "MOKD worse"
    else:
        verdict = "no clear difference (within 2 standard errors)"
    return {"mean": difference, "se": se, "paired_differences": paired, "verdict": verdict}


def summarize(records: list[dict]) -> dict:
    summary = {}
    for name in (records[0]["final_top1"] if records else {}):
        by_mode = {mode: {r["seed"]: r["final_top1"][name] for r in records if r["mode"] == mode} for mode in MODES}
        stats = {mode: mean_std([by_mode[mode][s] for s in sorted(by_mode[mode])]) for mode in MODES}
        common = sorted(set(by_mode["mokd"]) & set(by_mode["independent"]))
        paired = [by_mode["mokd"][s] - by_mode["independent"][s] for s in common]
        starts = [r["random_init_top1"][name] for r in records if r["random_init_top1"]]
        summary[name] = {**stats, "gain": gain(stats["mokd"], stats["independent"], paired),
                         "random_init": mean_std(starts)}
    return summary


CLIPPED = "clipped_fraction"


def gradient_shares(records: list[dict]) -> dict:
    """Per network and mode, from the runs' train.term_gradients_every lines: at each measured step the mean
    over seeds of each term's share of the backbone gradient (its norm / the sum of the terms' norms), of its
    norm and of the fraction of backbone tensors clipped; and those means over the whole run ({} if not
    measured)."""
    shares = {}
    for name in (records[0]["final_top1"] if records else {}):
        for mode in MODES:
            measured = [dict((step, values) for step, values in r.get("term_gradients", {}).get(name, []))
                        for r in records if r["mode"] == mode]
            steps = sorted(set().union(*measured)) if measured else []
            if steps:
                shares.setdefault(name, {})[mode] = mode_shares([m for m in measured if m], steps)
    return shares


def mode_shares(runs: list[dict], steps: list[int]) -> dict:
    def mean_over_seeds(step, value_of):
        values = [value_of(run[step]) for run in runs if step in run and value_of(run[step]) is not None]
        return statistics.fmean(values) if values else None

    terms = [t for t in runs[0][steps[0]] if t != CLIPPED]
    total = lambda values: sum(values[t] for t in terms)  # noqa: E731
    share = {t: [mean_over_seeds(step, lambda v, t=t: v[t] / total(v) if total(v) else None) for step in steps]
             for t in terms}
    norm = {t: [mean_over_seeds(step, lambda v, t=t: v[t]) for step in steps] for t in terms}
    clipped = [mean_over_seeds(step, lambda v: v.get(CLIPPED)) for step in steps]
    over_run = lambda series: statistics.fmean([v for v in series if v is not None]) if any(  # noqa: E731
        v is not None for v in series) else None
    return {"steps": steps, "share": share, "norm": norm, CLIPPED: clipped,
            "mean_share": {t: over_run(share[t]) for t in terms}, "mean_norm": {t: over_run(norm[t]) for t in terms},
            "mean_clipped_fraction": over_run(clipped)}


def fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def science_table(report: dict) -> str:
    lines = [f"k-NN top-1 (%) of the teachers after {report['steps']} steps, {report['config']}, "
             f"seeds {report['seeds']}",
             f"{'network':<28} {'random init':>15} {'mokd':>15} {'independent':>15} {'gain (± s.e.)':>16}  verdict"]
    for name in report["networks"]:
        net = report["summary"][name]
        cells = [f"{fmt(net[m]['mean'])} ± {fmt(net[m]['std'])}" for m in ("random_init", *MODES)]
        g = net["gain"]
        label = f"{name} {report['networks'][name]['arch']} λ={report['networks'][name]['lambda']}"
        lines.append(f"{label:<28} {cells[0]:>15} {cells[1]:>15} {cells[2]:>15} "
                     f"{fmt(g['mean'], '+.2f') + ' ± ' + fmt(g['se']):>16}  {g['verdict']}")
    for name, by_mode in report.get("gradient_shares", {}).items():
        for mode, g in by_mode.items():
            shown = "  ".join(f"{t} {fmt(100 * v if v is not None else None, '.0f')}%" for t, v in g["mean_share"].items())
            clipped = g["mean_clipped_fraction"]
            lines.append(f"gradient at {name}'s backbone, {mode}, mean over the run: {shown}; backbone tensors "
                         f"clipped {fmt(100 * clipped if clipped is not None else None, '.0f')}%")
    per_seed = [f"  {r['mode']:<11} seed {r['seed']}: " + "  ".join(f"{n} {v:.2f}" for n, v in r["final_top1"].items())
                + ("  (reused)" if r["reused"] else "") for r in report["runs"]]
    return "\n".join(lines + ["per run:"] + per_seed)


def plot(report: dict, path: Path) -> Path:
    """One panel per network: every run's k-NN curve (colour = mode), the final mean ± std per mode."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"mokd": "tab:red", "independent": "tab:blue"}
    names = list(report["networks"])
    shares = report.get("gradient_shares", {})
    rows = 2 if shares else 1
    figure, axes = plt.subplots(rows, len(names), figsize=(6 * len(names), 4.5 * rows), squeeze=False)
    for axis, name in zip(axes[0], names):
        for record in report["runs"]:
            steps, values = zip(*record["knn_curve"][name]) if record["knn_curve"][name] else ((), ())
            axis.plot(steps, values, "o-", color=colours[record["mode"]], alpha=0.45, markersize=3,
                      label=record["mode"] if record["seed"] == min(report["seeds"]) else None)
        for offset, mode in zip((-0.01, 0.01), MODES):
            stats = report["summary"][name][mode]
            if stats["mean"] is not None:
                axis.errorbar(report["steps"] * (1 + offset), stats["mean"], yerr=stats["std"] or 0, fmt="s",
                              color=colours[mode], capsize=4, markersize=7, label=f"{mode} mean ± std")
        g = report["summary"][name]["gain"]
        network = report["networks"][name]
        axis.set_title(f"{name}: {network['arch']} (λ={network['lambda']}); gain {fmt(g['mean'], '+.2f')}"
                       f" ± {fmt(g['se'])}")
        axis.set_xlabel("step")
        axis.set_ylabel("teacher k-NN top-1 (%)")
        axis.legend(fontsize=8)
    if shares:
        for axis, name in zip(axes[1], names):
            plot_shares(axis, name, shares.get(name, {}), colours)
    figure.suptitle(f"MOKD vs independent, {report['config']}, {len(report['seeds'])} seed(s), "
                    f"{report['steps']} steps (Fashion-MNIST)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_shares(axis, name: str, by_mode: dict, colours: dict) -> None:
    """Each term's share of the backbone gradient in MOKD (solid), the clipped fraction per mode (dashed)."""
    mokd = by_mode.get("mokd")
    if mokd:
        for term, series in mokd["share"].items():
            axis.plot(mokd["steps"], series, "o-", markersize=3, label=f"{term} share (mokd)")
    for mode, g in by_mode.items():
        axis.plot(g["steps"], g[CLIPPED], "--", color=colours[mode], label=f"backbone tensors clipped ({mode})")
    axis.set_ylim(0, 1)
    axis.set_title(f"{name}: share of the backbone gradient per term (mean over seeds)")
    axis.set_xlabel("step")
    axis.set_ylabel("fraction")
    axis.legend(fontsize=7)
