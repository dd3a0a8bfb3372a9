"""`moemesh bench plot` and `bench serve --plot`: latency CDFs and throughput bars of `bench serve` results,
and a side-by-side table with ratios to the first run. Needs matplotlib (the `bench` extra); the table does not.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# (title, per-request array in the JSON, flatten lists of lists)
CDFS = (("TTFT", "ttfts", False), ("ITL", "itls", True), ("End-to-end latency", "e2els", False))

LOG_FLOOR_MS = 0.01

# Rows of the comparison: (name, summary key, unit format, True if higher is better).
ROWS = (
    ("Successful requests", "completed", "d", True),
    ("Failed requests", "failed", "d", False),
    ("Duration (s)", "duration_s", ".2f", False),
    ("Request throughput (req/s)", "request_throughput", ".3f", True),
    ("Output tok/s", "output_throughput", ".1f", True),
    ("Total tok/s", "total_token_throughput", ".1f", True),
    ("Goodput (req/s)", "goodput", ".3f", True),
    ("Mean TTFT (ms)", "mean_ttft_ms", ".1f", False),
    ("Median TTFT (ms)", "median_ttft_ms", ".1f", False),
    ("P99 TTFT (ms)", "p99_ttft_ms", ".1f", False),
    ("Mean TPOT (ms)", "mean_tpot_ms", ".2f", False),
    ("Median TPOT (ms)", "median_tpot_ms", ".2f", False),
    ("P99 TPOT (ms)", "p99_tpot_ms", ".2f", False),
    ("Mean ITL (ms)", "mean_itl_ms", ".2f", False),
    ("Median ITL (ms)", "median_itl_ms", ".2f", False),
    ("P99 ITL (ms)", "p99_itl_ms", ".2f", False),
    ("Mean E2E (ms)", "mean_e2el_ms", ".1f", False),
    ("P99 E2E (ms)", "p99_e2el_ms", ".1f", False),
)


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def load_runs(paths: Sequence[str], labels: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Read `bench serve --result-json` files; `labels` replace their labels, in order."""
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"{len(labels)} labels for {len(paths)} results")
    runs = []
    for i, path in enumerate(paths):
        try:
            doc = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e})") from e
        if not isinstance(doc, dict) or "summary" not in doc or "requests" not in doc:
            raise ValueError(f"{path}: not a `moemesh bench serve` result (no summary/requests)")
        doc.setdefault("label", Path(path).stem)
        if labels is not None:
            doc["label"] = labels[i]
        runs.append(doc)
    return runs


def compare_table(runs: Sequence[dict[str, Any]]) -> str:
    """The runs side by side; for each later run a column `FIRST/THAT` of the ratio to it.

    Ratios are the first run's value over the other's: for a higher-is-better row (throughput) above 1
    means the first run is better; for a latency row, below 1 means the first run is better.
    """
    labels = [str(r["label"]) for r in runs]
    width = max(12, *(len(s) + 2 for s in labels))
    ratio_heads = [f"{labels[0]}/{s}" for s in labels[1:]]
    rwidth = max([12, *(len(h) + 2 for h in ratio_heads)])
    head = f"{'metric':<30}" + "".join(f"{s:>{width}}" for s in labels) + "".join(f"{h:>{rwidth}}" for h in ratio_heads)
    lines = [head, "-" * len(head)]
    for name, key, fmt, higher in ROWS:
        values = [r["summary"].get(key) for r in runs]
        if all(v is None for v in values):
            continue
        cells = "".join(f"{'n/a' if v is None else format(v, fmt):>{width}}" for v in values)
        ratios = ""
        for v in values[1:]:
            first = values[0]
            ok = first is not None and v and key not in ("completed", "failed")
            ratios += f"{(f'{first / v:.2f}x' if ok else ''):>{rwidth}}"
        arrow = " (+)" if higher else " (-)"
        lines.append(f"{name + arrow:<30}{cells}{ratios}")
    lines.append("(+) higher is better, (-) lower is better; ratios are the first run's value over each other's")
    return "\n".join(lines)


def _values_ms(run: dict[str, Any], key: str, flatten: bool) -> list[float]:
    arr = run["requests"].get(key) or []
    if flatten:
        arr = [x for sub in arr for x in (sub or [])]
    return sorted(x * 1e3 for x in arr if x is not None)


def plot_runs(runs: Sequence[dict[str, Any]], out: str | Path, title: str | None = None) -> Path:
    """One PNG: a CDF per latency metric (every run overlaid) and a bar chart of output tokens/s."""
    try:
        import matplotlib
    except ImportError as e:
        raise PlotUnavailable("plotting needs matplotlib: pip install 'moemesh[bench]' (or matplotlib)") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    for ax, (name, key, flatten) in zip(axes.flat, CDFS, strict=False):
        series = [(run, _values_ms(run, key, flatten)) for run in runs]
        # A long tail (a prefill stalling decode) squeezes the body of a linear axis: go logarithmic.
        spread = [xs[-1] / max(xs[len(xs) // 2], 1e-9) for _, xs in series if xs]
        log_x = bool(spread) and max(spread) > 20
        for run, xs in series:
            if not xs:
                continue
            if log_x:  # gaps of 0 (chunks that arrived in one read) cannot sit on a log axis
                xs = [max(x, LOG_FLOOR_MS) for x in xs]
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            ax.step(xs, ys, where="post", label=f"{run['label']} (n={len(xs)})")
        if log_x:
            ax.set_xscale("log")
        ax.set_title(f"{name} CDF")
        ax.set_xlabel(f"ms{f' (log scale; values below {LOG_FLOOR_MS} ms drawn at it)' if log_x else ''}")
        ax.set_ylabel("fraction of " + ("gaps" if flatten else "requests"))
        ax.set_ylim(0, 1.02)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    ax = axes.flat[3]
    labels = [str(r["label"]) for r in runs]
    tput = [r["summary"].get("output_throughput") or 0.0 for r in runs]
    bars = ax.bar(range(len(runs)), tput, color=[f"C{i}" for i in range(len(runs))])
    for bar, run in zip(bars, runs, strict=True):
        s = run["summary"]
        ax.annotate(f"{s.get('output_throughput') or 0:.1f} tok/s\n{s.get('request_throughput') or 0:.2f} req/s",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(runs)), labels)
    ax.set_ylabel("output tokens/s")
    ax.set_title("Output token throughput")
    ax.set_ylim(0, max([*tput, 1e-9]) * 1.25)
    ax.grid(True, axis="y", alpha=0.3)
    cfg = runs[0].get("config", {})
    fig.suptitle(title or (f"bench serve: {cfg.get('input_len')} in / {cfg.get('output_len')} out, "
                           f"{cfg.get('num_prompts')} prompts, concurrency {cfg.get('max_concurrency')}, "
                           f"rate {cfg.get('request_rate')}"))
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
