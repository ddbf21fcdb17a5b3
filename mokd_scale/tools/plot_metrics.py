"""Plot a run's loss terms and k-NN accuracy from OUTPUT/metrics.jsonl.

    mokd-plot runs/tiny_cpu/metrics.jsonl --out runs/tiny_cpu/metrics.png
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


def read_metrics(path: str | Path) -> list[dict]:
    """One dict per logged step; a torn last line (run still writing) is ignored."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [row for row in rows if "step" in row]


def networks_of(rows: list[dict]) -> list[str]:
    """The run's networks, in the order metrics.jsonl names them: every `X.loss` key names one."""
    names = []
    for row in rows:
        names += [key[:-len(".loss")] for key in row if key.endswith(".loss") and key.count(".") == 1
                  and key[:-len(".loss")] not in names]
    return names


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(row["step"], row[key]) for row in rows if row.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot(rows: list[dict], out: str | Path, baselines: dict[str, float] | None = None,
         final: dict[str, tuple[int, float]] | None = None, out_dim: int = 0,
         title: str = "MOKD training") -> Path:
    """A panel of loss terms per network (the registry's terms the run logged), then k-NN top-1.

    baselines: {network: random-init top-1} (dashed lines); final: {network: (step, top-1)} of
    an evaluation after training; out_dim K draws ln K, the loss of a collapsed (uniform) target.
    """
    import matplotlib
    matplotlib.use("Agg")  # files only; the demo runs headless
    import matplotlib.pyplot as plt

    from mokd_scale.method.terms import TERMS  # imports torch: not at `mokd-plot --help`

    names = networks_of(rows)
    figure, axes = plt.subplots(1, len(names) + 1, figsize=(5.3 * (len(names) + 1), 4.5), squeeze=False)
    axes = axes[0]
    for axis, network in zip(axes[:-1], names):
        for term in TERMS:
            steps, values = series(rows, f"{network}.{term}")
            if steps:
                axis.plot(steps, values, label=term)
        if out_dim:
            axis.axhline(math.log(out_dim), color="grey", linestyle=":", label="ln K (uniform)")
        axis.set_title(f"network {network}: loss terms")
        axis.set_xlabel("step")
        axis.legend(fontsize=8)
    knn_axis = axes[-1]
    for network, colour in zip(names, COLOURS * len(names)):
        steps, values = series(rows, f"knn.{network}.top1")
        if final and network in final:  # the end-of-run evaluation joins the periodic ones
            steps, values = steps + [final[network][0]], values + [final[network][1]]
        if steps:
            knn_axis.plot(steps, values, "o-", color=colour, label=f"{network} teacher")
        if baselines and network in baselines:
            knn_axis.axhline(baselines[network], color=colour, linestyle="--",
                             label=f"{network} random init")
    knn_axis.set_title("k-NN top-1 (%)")
    knn_axis.set_xlabel("step")
    knn_axis.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", help="OUTPUT/metrics.jsonl")
    parser.add_argument("--out", required=True, help="PNG file to write")
    args = parser.parse_args(argv)
    if not Path(args.metrics).is_file():
        print(f"error: {args.metrics} not found: pass the metrics.jsonl of a run", file=sys.stderr)
        return 2
    print(plot(read_metrics(args.metrics), args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
