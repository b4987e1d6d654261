"""PNG plots of a bench report (matplotlib, headless): speed-up per category per method, stacked
tier rates per category, and the speed-quality frontier of a threshold sweep. Every figure is
titled with the model, the machine and the date, so a picture read alone still says what it is."""

from __future__ import annotations

from pathlib import Path

TIER_COLORS = {"accept": "#2ca02c", "slim": "#ff7f0e", "full": "#d62728"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _subtitle(report: dict) -> str:
    m = report["machine"]
    return f"{Path(str(report['model'])).name} | {m.get('cpu', '?')}, threads: {m.get('threads', '?')} | {report['date'][:10]}"


def plot_speedup(report: dict, path: Path) -> Path | None:
    runs = [r for r in report["runs"] if r.get("speedup_vs_off") is not None]
    if not runs:
        return None
    plt = _plt()
    cats = list(runs[0]["per_category"]) + ["overall"]
    fig, ax = plt.subplots(figsize=(max(7, 1.3 * len(cats) * max(1, len(runs)) / 3), 4.5))
    width = 0.8 / len(runs)
    for i, r in enumerate(runs):
        vals = [r["per_category"].get(c, {}).get("speedup_vs_off") or 0 for c in cats[:-1]] + [r["speedup_vs_off"]]
        ax.bar([j + i * width - 0.4 + width / 2 for j in range(len(cats))], vals, width, label=r["name"])
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(cats)), cats, rotation=20)
    ax.set_ylabel("speed-up over off (tokens/s ratio)")
    ax.set_title("Speed-up per category\n" + _subtitle(report), fontsize=10)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_tiers(report: dict, path: Path) -> Path | None:
    runs = [r for r in report["runs"] if r.get("kind") == "engine" and r.get("tier_rates")]
    if not runs:
        return None
    plt = _plt()
    cats = list(runs[0]["per_category"]) + ["overall"]
    fig, axes = plt.subplots(1, len(runs), figsize=(max(5, 4.2 * len(runs)), 4.2), squeeze=False, sharey=True)
    for ax, r in zip(axes[0], runs):
        bottom = [0.0] * len(cats)
        rates = [(r["per_category"].get(c) or {}).get("tier_rates") for c in cats[:-1]] + [r["tier_rates"]]
        for tier, color in TIER_COLORS.items():
            vals = [(t or {}).get(tier, 0.0) for t in rates]
            ax.bar(range(len(cats)), vals, 0.7, bottom=bottom, color=color, label=tier)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_xticks(range(len(cats)), cats, rotation=35, fontsize=8)
        ax.set_title(r["name"], fontsize=10)
        ax.set_ylim(0, 1.0)
    axes[0][0].set_ylabel("share of decided draft positions")
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle("Tier rates per category\n" + _subtitle(report), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sweep(report: dict, path: Path) -> Path | None:
    sw = report.get("sweep")
    if not sw or not sw.get("points"):
        return None
    plt = _plt()
    key = sw["quality_key"]
    fig, ax = plt.subplots(figsize=(7, 5))
    pts = [p for p in sw["points"] if p["quality"].get(key) is not None]
    xs = [p.get("speedup_vs_off") or p["tokens_per_s"] for p in pts]
    xlabel = "speed-up over off" if all(p.get("speedup_vs_off") for p in pts) else "tokens/s"
    ys = [p["quality"][key] for p in pts]
    ax.scatter(xs, ys, color="#1f77b4", s=25)
    for p, x, y in zip(pts, xs, ys):
        ax.annotate(p["name"].split("[", 1)[-1].rstrip("]") or "default", (x, y), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    front = sorted((x, y) for p, x, y in zip(pts, xs, ys) if p.get("pareto"))
    if front:
        ax.plot([f[0] for f in front], [f[1] for f in front], color="#d62728", linewidth=1.2, marker="o",
                markerfacecolor="none", markersize=10, label="frontier")
    for ref in report["runs"]:
        if ref["name"] in ("binary", "off") and ref["quality"].get(key) is not None:
            x = ref.get("speedup_vs_off") if xlabel.startswith("speed") else ref["tokens_per_s"]
            if x is not None:
                ax.scatter([x], [ref["quality"][key]], marker="s", color="black", s=30)
                ax.annotate(ref["name"], (x, ref["quality"][key]), fontsize=8, xytext=(3, -10), textcoords="offset points")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"quality: {key}")
    ax.set_title("three_tier threshold sweep: speed vs quality\n" + _subtitle(report), fontsize=10)
    if front:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(report: dict, stem: Path) -> list[Path]:
    """Draw every plot the report has data for, next to `stem` (`<stem>_speedup.png`, ...)."""
    made = []
    for suffix, fn in (("speedup", plot_speedup), ("tiers", plot_tiers), ("sweep", plot_sweep)):
        p = fn(report, stem.parent / f"{stem.name}_{suffix}.png")
        if p is not None:
            made.append(p)
    return made
