"""Plot a results page of benchmarks/results/ as a PNG beside it.

    python3 benchmarks/plot_results.py benchmarks/results/decode_h200.md [...]

Reads the page's first table (the current grid) and the device / date / commit line
above it, as written by bench_decode.py or bench_attention.py:
  decode   K/V read rate (TB/s) against context length, one panel per batch size,
           pagedflash and every SDPA backend that ran;
  prefill  TFLOP/s against sequence length, one panel per (head dim, causal,
           forward / backward), pagedflash and SDPA's backends.
Writes <page>.png (needs matplotlib; it is not a dependency of the package).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path


def first_table(text: str) -> tuple[list[str], list[list[str]], str]:
    """(header, rows, provenance line) of the first markdown table of a page."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    head = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    prov = next((line for line in reversed(lines[:start]) if re.match(r"(?i)device:", line)), "")
    return head, rows, prov


def number(cell: str) -> float | None:
    """The leading number of a cell ('12.5', '12.5 (3.41) ...', 'skipped' -> None)."""
    m = re.match(r"\s*([-+]?\d+(?:\.\d+)?)", cell)
    return float(m.group(1)) if m else None


def rate_in_parens(cell: str) -> float | None:
    m = re.search(r"\(([-+]?\d+(?:\.\d+)?)\)", cell)
    return float(m.group(1)) if m else None


def short_provenance(prov: str) -> str:
    keep = [p.strip() for p in re.split(r"[;,]", prov) if re.search(r"(?i)device|date|commit", p)]
    return "; ".join(keep)[:160]


def finish(fig, axes, title):
    """One legend below the panels, the provenance line above them."""
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 0.97))
    return fig


def plot_decode(plt, head, rows, title):
    col = {name: i for i, name in enumerate(head)}
    backends = [h[: -len(" us (TB/s)")] for h in head if h.endswith(" us (TB/s)")]
    batches = sorted({int(r[col["batch"]]) for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.2 * len(batches), 3.8), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        sel = [r for r in rows if int(r[col["batch"]]) == batch]
        ctx = [int(r[col["context"]]) for r in sel]
        ax.plot(ctx, [number(r[col["TB/s"]]) for r in sel], "o-", lw=2.2, label="pagedflash (paged)")
        for name in backends:
            ys = [rate_in_parens(r[col[f"{name} us (TB/s)"]]) for r in sel]
            pts = [(x, y) for x, y in zip(ctx, ys) if y is not None]
            if pts:
                ax.plot(*zip(*pts), ".--", label=f"SDPA {name} (contiguous)")
        ax.set_xscale("log", base=2)
        ax.set_title(f"batch {batch}")
        ax.set_xlabel("context (tokens)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("K/V read, TB/s")
    return finish(fig, axes, title)


def plot_prefill(plt, head, rows, title):
    col = {name: i for i, name in enumerate(head)}
    groups = sorted({(int(r[col["d"]]), r[col["causal"]]) for r in rows})
    systems = [
        ("pf", "pagedflash"),
        ("pf80", "pagedflash sm_80 kernels"),
        ("pf90", "pagedflash sm_90 kernels"),
        ("fa2", "SDPA FLASH_ATTENTION"),
        ("cudnn", "SDPA CUDNN_ATTENTION"),
        ("eff", "SDPA EFFICIENT_ATTENTION"),
    ]
    fig, axes = plt.subplots(2, len(groups), figsize=(3.8 * len(groups), 6.6), squeeze=False)
    for j, (d, causal) in enumerate(groups):
        sel = [r for r in rows if int(r[col["d"]]) == d and r[col["causal"]] == causal]
        s = [int(r[col["s"]]) for r in sel]
        for i, pas in enumerate(("fwd", "bwd")):
            ax = axes[i][j]
            for key, label in systems:
                name = f"{key}_{pas}"
                if name in col:
                    ys = [number(r[col[name]]) for r in sel]
                    pts = [(x, y) for x, y in zip(s, ys) if y is not None]  # '-': not run at that point
                    if pts:
                        style = "o-" if key == "pf" else ".--"
                        ax.plot(*zip(*pts), style, lw=2.2 if key == "pf" else 1.2, label=label)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{pas}, d={d}, causal={causal}", fontsize=9)
            ax.grid(alpha=0.3)
            if i == 1:
                ax.set_xlabel("sequence length")
            if j == 0:
                ax.set_ylabel("TFLOP/s")
    return finish(fig, axes, title)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pages", nargs="+", type=Path)
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    status = 0
    for page in args.pages:
        head, rows, prov = first_table(page.read_text())
        title = f"{page.stem}: {short_provenance(prov)}"
        if "context" in head:
            fig = plot_decode(plt, head, rows, title)
        elif "pf_fwd" in head:
            fig = plot_prefill(plt, head, rows, title)
        else:
            print(f"{page}: no decode or prefill table, skipped", file=sys.stderr)
            status = 1
            continue
        out = page.with_suffix(".png")
        fig.savefig(out, dpi=90)
        plt.close(fig)
        print(out)
    return status


if __name__ == "__main__":
    sys.exit(main())
