"""The benchmark's figures (PNG): for one table, the anytime curve of the exported configuration's true quality
per strategy (mean +- standard error over replay seeds) and the normalised regret at each budget; for the
suite, each strategy's average rank by budget and the regret per table."""
from __future__ import annotations

from pathlib import Path


def draw(result: dict, path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = result["table"]
    grid = table["grid_device_seconds"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14.5, 4.8))
    for name, c in result["curves"].items():
        xs = [s / grid * 100 for s in c["seconds"]]
        lo = [m - e for m, e in zip(c["mean"], c["se"])]
        hi = [m + e for m, e in zip(c["mean"], c["se"])]
        left.plot(xs, c["mean"], label=name)
        left.fill_between(xs, lo, hi, alpha=0.2)
    best, noise = table["best"]["mean"], table["noise"]
    left.axhline(best, color="black", lw=1, ls="--", label="grid's best (true mean)")
    left.axhspan(best - noise, best, color="grey", alpha=0.15, label="within seed noise")
    left.axhline(table["median"], color="grey", lw=1, ls=":", label="median configuration")
    left.set_xlabel("device-seconds spent (% of the whole grid)")
    left.set_ylabel("true quality of the export (mean over seeds)")
    left.set_title(f"anytime, budget {result['curve_budget']:.0%} of the grid, {result['seeds']} seeds")
    left.legend(fontsize=7)
    for name in result["strategies"]:
        rows = sorted((r for r in result["rows"] if r["strategy"] == name), key=lambda r: r["budget"])
        right.errorbar([r["budget"] * 100 for r in rows], [r["regret"][0] for r in rows],
                       yerr=[r["regret"][1] for r in rows], marker="o", capsize=3, label=name)
    right.axhline(0, color="black", lw=1, ls="--")
    right.set_xlabel("budget (% of the grid's device-seconds)")
    right.set_ylabel("normalised regret (0 best, 1 median)")
    right.set_title("regret of the exported configuration")
    right.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the curves cross
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def draw_suite(suite: dict, path: str | Path) -> Path:
    """Average rank per strategy by budget (left); normalised regret per table at 25% of the grid (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(14.5, 4.8))
    budgets = suite["budgets"]
    # one colour per strategy, the same on both sides (tab20: 20 before one repeats); the peers dashed, a
    # marker per package
    palette = plt.get_cmap("tab20").colors
    color = {s: palette[i % len(palette)] for i, s in enumerate(suite["strategies"])}
    markers = {"optuna": "s", "ray": "^", "smac": "D", "syne": "v"}
    for s in suite["strategies"]:
        peer = s.split(":")[0] if ":" in s else None
        left.plot([b * 100 for b in budgets], [suite["ranks"][b][s] for b in budgets], color=color[s],
                  marker=markers.get(peer, "o"), linestyle="--" if peer else "-", label=s)
    left.set_xlabel("budget (% of each table's grid)")
    left.set_ylabel("average rank across tables (1 = lowest regret)")
    left.invert_yaxis()
    left.set_title(f"{len(suite['tables'])} tables, {suite['seeds']} replays each")
    at = min(budgets, key=lambda b: abs(b - 0.25))
    names, width = list(suite["tables"]), 0.8 / max(len(suite["strategies"]), 1)
    for j, s in enumerate(suite["strategies"]):
        rows = [next((r for r in suite["tables"][n]["rows"] if r["strategy"] == s and r["budget"] == at), None)
                for n in names]  # None: not replayed on that table
        right.bar([i + j * width for i in range(len(names))], [r["regret"][0] if r else 0.0 for r in rows], width,
                  yerr=[r["regret"][1] if r else 0.0 for r in rows], label=s, color=color[s],
                  hatch="//" if ":" in s else None, edgecolor="white", linewidth=0)
    right.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, fontsize=8, rotation=12)
    right.set_ylabel("normalised regret (0 best, 1 median)")
    right.set_title(f"per table at {at:.0%} of the grid")
    right.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


__all__ = ["draw", "draw_suite"]
