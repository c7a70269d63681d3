"""Tables and figures of the perturbation experiment (experiments/perturb.py): the long table of
every variant, the one-line-per-hook summary (the curve KL(cos) and each SAE's point against a
random error of its cosine and norm), and KL (log scale) against cosine, one panel per hook.
They read the result dicts only, so a saved perturb.json can be drawn again."""

from __future__ import annotations

import math
from pathlib import Path

from saelab.plots import save_figure
from saelab.tables import Column, format_rows

FLOOR = 1e-9  # KL can be exactly 0 (cos 1 with the same norm); a log axis needs > 0
TABLE = (Column("variant"), Column("cos_target", "cos target", "g"), Column("cos", fmt=".4f"),
         Column("norm_ratio", "norm ratio", ".3f"), Column("ce", "CE", ".4f"),
         Column("ce_delta", "CE - clean", "+.4f"), Column("kl", "KL", ".4g"))
HOOK_TABLE = (Column("hook"), Column("sae", "SAE"), *TABLE)
POINT_COLUMNS = (Column("sae_cos", "SAE cos", ".4f"), Column("sae_kl", "SAE KL", ".4g"),
                 Column("matched_kl", "random KL at SAE's cos & norm", ".4g"),
                 Column("ratio", "SAE / random", ".3g"))


def format_table(result: dict) -> str:
    """One SAE (`perturbation_table`): the clean CE, then a Markdown table of the rows."""
    head = f"Hook `{result['hook']}`, clean CE {result['ce_clean']:.4f} nats over {result['n_tokens']} tokens."
    if result.get("outliers_kept"):
        head += (f" {result['outliers_kept']} positions (norm above {result['outlier_multiple']:g}x the median) kept "
                 "their clean activation in every variant.")
    return f"{head}\n\n{format_rows(result['rows'], TABLE, style='markdown')}\n"


def summary_rows(result: dict) -> list[dict]:
    """Per hook: a row for the curve keeping the activation's norm (where drawn and no SAE's row
    shows it), and one per SAE there with the curve it is compared to (its own output norm's where drawn, else the
    activation's): the norm kept, KL at each target cosine ("kl@<c>"), and the SAE's cosine and
    KL against the KL of the random error with its cosine and norm, token by token ("ratio" > 1:
    the SAE's error hurts more than a random one)."""
    out = []
    for hook in result["hooks"]:
        here = [r for r in result["rows"] if r["hook"] == hook]
        curves = {r["sae"] for r in here if r["variant"] == "random"}
        labels = [s for s, h in result["saes"].items() if h == hook]
        shown = None in curves and all(label in curves for label in labels)  # else an SAE's row shows it
        for label in ([None] if shown else []) + labels:
            owner = label if label in curves else None
            row = {"hook": hook, "sae": label, "norm": "SAE output" if owner else "activation"}
            row.update({f"kl@{r['cos_target']:g}": r["kl"] for r in here
                        if r["variant"] == "random" and r["sae"] == owner})
            if label is not None:
                point = {r["variant"]: r["kl"] for r in here if r["sae"] == label and r["variant"] != "random"}
                sae_cos = next(r["cos"] for r in here if r["sae"] == label and r["variant"] == "sae")
                row.update(sae_cos=sae_cos, sae_kl=point["sae"], matched_kl=point["random_matched"],
                           ratio=point["sae"] / point["random_matched"] if point["random_matched"] > 0 else math.nan)
            out.append(row)
    return out


def format_hook_table(result: dict, full: bool = False) -> str:
    """Clean CE, then the summary (one row per hook and SAE); with `full`, every variant too."""
    cos = result["config"]["cos_targets"]
    columns = [Column("hook"), Column("sae", "SAE"), Column("norm", "norm kept"),
               *(Column(f"kl@{c:g}", f"KL @ {c:g}", ".3g") for c in cos)]
    if result["saes"]:
        columns += POINT_COLUMNS
    head = (f"Model `{result.get('model') or '?'}`, clean CE {result['ce_clean']:.4f} nats over "
            f"{result['n_tokens']} tokens; KL(clean || perturbed), nats / token.")
    text = f"{head}\n\n{format_rows(summary_rows(result), columns, style='markdown')}\n"
    if full:
        text += f"\nEvery variant:\n\n{format_rows(result['rows'], HOOK_TABLE, style='markdown')}\n"
    return text


def kl_panel(ax, rows: list[dict], title: str, colors: dict | None = None) -> None:
    """One hook's axes: each curve (grey for |x'| = |x|, else its SAE's colour), each SAE's point
    (star) and its matched random perturbation (square)."""
    colors = colors or {}
    for owner in dict.fromkeys(r.get("sae") for r in rows if r["variant"] == "random"):
        curve = sorted((r["cos"], max(r["kl"], FLOOR)) for r in rows
                       if r["variant"] == "random" and r.get("sae") == owner)
        label = "random, activation's norm" if owner is None else f"random, {owner}'s output norm"
        ax.plot(*zip(*curve), "o-", color=colors.get(owner, "tab:gray"), label=label)
    for r in rows:
        name = r.get("sae") or "SAE"
        if r["variant"] == "sae":
            ax.plot([r["cos"]], [max(r["kl"], FLOOR)], "*", color=colors.get(r.get("sae"), "r"),
                    markersize=11, label=name)
        elif r["variant"] == "random_matched":
            ax.plot([r["cos"]], [max(r["kl"], FLOOR)], "s", color=colors.get(r.get("sae"), "b"),
                    markerfacecolor="none", markersize=9, label=f"random, {name}'s cos & norm")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)


def plot_kl_vs_cos(result: dict, path: str | Path, title: str = "") -> Path:
    """One SAE: KL (log scale) against cosine: the random curve, the SAE's point, the matched random."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.2))
    ax = fig.add_subplot()
    kl_panel(ax, result["rows"], title or result["hook"])
    ax.set_xlabel("cosine similarity to the original activation")
    ax.set_ylabel("KL(clean || spliced), nats / token")
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def plot_hooks(result: dict, path: str | Path, columns: int = 3) -> Path:
    """KL against cosine, one panel per hook in forward order, `columns` to a row (the `layers`
    shorthand gives a row per layer: attention out, MLP out, residual stream), on one KL axis
    so that hooks' robustness compares at a glance."""
    from matplotlib.figure import Figure

    hooks = result["hooks"]
    cols = min(columns, len(hooks))
    n_rows = math.ceil(len(hooks) / cols)
    palette = ("tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown")
    colors = {label: palette[i % len(palette)] for i, label in enumerate(result["saes"])}
    fig = Figure(figsize=(4.2 * cols, 3.2 * n_rows))
    axes = fig.subplots(n_rows, cols, squeeze=False, sharey=True)  # hooks compared at a glance
    for ax, hook in zip(axes.flat, hooks):
        kl_panel(ax, [r for r in result["rows"] if r["hook"] == hook], hook, colors)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(hooks):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("cosine similarity to the activation", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("KL(clean || perturbed)", fontsize=8)
    fig.suptitle(f"{Path(result.get('model') or '').name}: random perturbations keeping the norm"
                 + (" vs SAEs" if result["saes"] else ""), fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
