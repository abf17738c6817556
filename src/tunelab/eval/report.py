"""The evaluation report as data: the table (one row per model x quantization), the generations side
by side, and the quality-vs-file-size plot. Printed by the pipeline, logged by tracking."""
from __future__ import annotations

from typing import Dict, List

# Columns computed by the stage itself, after the configured metrics, in this order.
LOGIT_COLUMNS = ("perplexity", "kl_divergence", "top1_agreement")
SPEED_COLUMNS = ("prompt_tokens_per_s", "gen_tokens_per_s")


def metric_columns(summary: dict) -> List[str]:
    """The headline first, then the other configured metrics, the logit scores, size and speed."""
    names = list(dict.fromkeys(n for per_quant in summary["metrics"].values()
                               for scores in per_quant.values() for n in scores))
    names += list(SPEED_COLUMNS) if summary.get("speed") else []
    fixed = (*LOGIT_COLUMNS, "file_size", *SPEED_COLUMNS)
    configured = [n for n in names if n not in fixed and n != summary["headline"]]
    return [summary["headline"], *configured, *(n for n in fixed if n in names)]


def status(summary: dict, variant: str, quant: str) -> str:
    verdict = summary["verdict"]
    if variant != "finetuned":
        return ""
    if quant in verdict["broken"]:
        return "BROKEN"
    return "ship" if quant == verdict["ship"] else ("reference" if quant == verdict["reference"] else "ok")


def report_rows(summary: dict) -> List[Dict]:
    """One dict per (model, quantization): model, quant, every column (None where not measured), status."""
    columns, speed = metric_columns(summary), summary.get("speed", {})
    return [{"model": variant, "quant": quant,
             **{c: {**scores, **speed.get(variant, {}).get(quant, {})}.get(c) for c in columns},
             "status": status(summary, variant, quant)}
            for variant, per_quant in summary["metrics"].items() for quant, scores in per_quant.items()]


def side_by_side(generations: List[dict], limit: int) -> Dict[str, list]:
    """The first `limit` eval prompts, one row each: the reference and every GGUF's answer beside it
    (columns `base.f16`, `finetuned.f16`, `finetuned.q5_k_m`, ...; base first)."""
    files = sorted({(g["variant"], g["quant"]) for g in generations}, key=lambda vq: (vq[0] != "base", vq))
    per_file = {vq: [g for g in generations if (g["variant"], g["quant"]) == vq] for vq in files}
    first = per_file[files[0]][:limit]
    table = {"prompt": [g["prompt"] for g in first], "reference": [g["reference"] for g in first]}
    for variant, quant in files:
        table[f"{variant}.{quant}"] = [g["answer"] for g in per_file[(variant, quant)][:limit]]
    return table


def quality_size_figure(summary: dict):
    """Headline metric (and KL divergence from the reference, when measured) against file size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report_rows(summary)
    panels = [summary["headline"]] + (["kl_divergence"] if any(r.get("kl_divergence") is not None for r in rows) else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, column in zip(axes[0], panels):
        for variant, marker in (("finetuned", "o"), ("base", "s")):
            points = sorted((r for r in rows if r["model"] == variant and r[column] is not None),
                            key=lambda r: r["file_size"])
            if not points:
                continue
            ax.plot([r["file_size"] / 1e6 for r in points], [r[column] for r in points], marker + "-", label=variant)
            for r in points:
                ax.annotate(r["quant"] + (" (broken)" if r["status"] == "BROKEN" else ""),
                            (r["file_size"] / 1e6, r[column]), textcoords="offset points", xytext=(4, 4), fontsize=8,
                            color="red" if r["status"] == "BROKEN" else "black")
        ax.set_xlabel("GGUF file size (MB)")
        ax.set_ylabel(column)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    plt.close(fig)
    return fig
