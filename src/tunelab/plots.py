"""Figures logged to MLflow (matplotlib, headless). Imported lazily by tracking: matplotlib is slow to load."""
from __future__ import annotations


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_figure(steps):
    """The training loss per step."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([s["step"] for s in steps], [s["loss"] for s in steps], marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (assistant tokens)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    plt.close(fig)
    return fig


def sweep_objective_figure(table: dict, direction: str):
    """One bar per job (in job order) with its objective value; the best in a strong colour."""
    plt = _pyplot()
    order = sorted(range(len(table["job"])), key=lambda i: int(table["job"][i]) if table["job"][i].isdigit() else 0)
    labels = [f"{table['job'][i]}: {table['overrides'][i]}" for i in order]
    values = [table["objective_value"][i] for i in order]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(order) + 2), 4))
    colours = ["tab:green" if table["rank"][i] == 1 else "tab:blue" for i in order]
    ax.bar(range(len(order)), [v or 0.0 for v in values], color=colours)
    for x, (i, value) in enumerate(zip(order, values)):
        ax.annotate(table["status"][i] if value is None else f"{value:.3g}", (x, value or 0.0),
                    ha="center", va="bottom", fontsize=8, color="red" if value is None else "black")
    ax.set_xticks(range(len(order)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(f"{table['objective'][0] if order else 'objective'} ({direction})")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    plt.close(fig)
    return fig
