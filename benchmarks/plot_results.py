"""Plot benchmark CSVs (from bench_attention.py) as time ratios to a baseline contender.

    python benchmarks/plot_results.py results/*.csv --baseline sdpa-cudnn --out docs/perf.png
"""

import argparse
import csv
import math


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", nargs="+")
    parser.add_argument("--baseline", default="sdpa-cudnn")
    parser.add_argument("--out", default="benchmark.png")
    parser.add_argument("--title", default="")
    parser.add_argument("--contenders", nargs="+", default=None,
                        help="plot only these (default: every contender in the CSVs)")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for path in args.csv for r in csv.DictReader(open(path))]
    base = {(r["shape"], r["mode"]): float(r["ms"]) for r in rows
            if r["contender"] == args.baseline}
    groups = sorted({(r["shape"], r["mode"]) for r in rows if (r["shape"], r["mode"]) in base},
                    key=lambda g: (g[1], g[0]))
    contenders = [c for c in dict.fromkeys(r["contender"] for r in rows)
                  if args.contenders is None or c in args.contenders]
    fig, ax = plt.subplots(figsize=(max(8, 1.4 * len(groups)), 4.5))
    width = 0.8 / len(contenders)
    for i, name in enumerate(contenders):
        values = []
        for shape, mode in groups:
            ms = [float(r["ms"]) for r in rows if r["contender"] == name and r["shape"] == shape
                  and r["mode"] == mode]
            values.append(ms[0] / base[(shape, mode)] if ms and not math.isnan(ms[0]) else 0)
        ax.bar([g + i * width for g in range(len(groups))], values, width, label=name)
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    ax.set_xticklabels([f"{s.split(' H')[0]} {s.split('w=')[1].split()[0]}\n{m}"
                        for s, m in groups], fontsize=8)
    ax.set_ylabel(f"time / {args.baseline} (lower is better)")
    ax.set_title(args.title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
