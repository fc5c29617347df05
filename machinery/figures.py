"""
machinery/figures.py: how the repository draws its numbers: train.py's loss curve and the three
figures of equivalence.py, each titled with its model, for a slide (12-pt text on a 7.5-inch figure
saved at 150 dpi: 1,125 px wide, readable on a 1280-px projector). Every file is written through
machinery/files.py's write_files by the caller. A first read skips this file.
"""
from functools import partial

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

SLIDE = {"font.size": 12}                       # every text of a figure: 12 pt or more
NAMES = {"results/base/model.pt": "the miniature", "smollm2-135m": "SmolLM2-135M"}   # in titles


def loss_figure(results, mode, task):
    """train.py's loss.png: the training loss of every step. A matplotlib Figure, not pyplot, so
    that drawing it never touches pyplot's backend (the notebooks call train.py)."""
    fig = Figure(figsize=(6, 3.5), layout="tight")
    ax = fig.subplots()
    ax.plot(results["losses"], lw=0.8)
    ax.set(xlabel="step", ylabel="loss (completion tokens)", yscale="log",
           title=f"{mode} on {task}: {results['base_accuracy']:.0%} -> {results['accuracy']:.0%}")
    return fig


def equivalence_figures(r, eps, rank):
    """equivalence.py's results r -> {name: figure}: first_order (THEORY §4), sites (§4–§5),
    mlp_share (§5). The sites and shift kinds are the keys of r["site_recovery"]."""
    sites, kinds = list(r["site_recovery"]), list(next(iter(r["site_recovery"].values())))
    model = NAMES.get(r["model"], r["model"])
    with plt.rc_context(SLIDE):
        figures = {name: plt.subplots(figsize=(7.5, 4.5)) for name in ("first_order", "sites", "mlp_share")}
        ax, bx, cx = (axes for _, axes in figures.values())
        for kind, f in r["first_order"].items():
            ax.loglog(eps, f["errors"], "o-", label=f"{kind}, ε·jvp: slope {f['slope']:.2f}")
            ax.loglog(eps, f["control_errors"], "s--",
                      label=f"{kind}, no ΔW_proj·m: slope {f['control_slope']:.2f}")
        ax.set(xlabel="update size ε", ylabel="max |z(θ+εΔ) − z(θ) − ε·pred.|",
               title=f"THEORY §4: first-order error\n{model}, a random update")
        ax.legend()
        for i, kind in enumerate(kinds):
            bx.bar(np.arange(len(sites)) + 0.27 * (i - 1),
                   [r["site_recovery"][s][kind] for s in sites], 0.27, label=kind)
        bx.set(xticks=range(len(sites)), xticklabels=sites, ylabel="share of δz recovered",
               ylim=(0, 1.25), title=f"THEORY §4–§5: where to steer (rank {rank})\n"
                                     f"{model}, a random update")
        bx.legend(ncol=3, loc="upper center")
        cx.plot(r["mlp_share"], "o-", label=f"{r['tokens']} tokens")
        cx.set(xlabel="layer ℓ", ylabel="MLP share_ℓ = ‖y‖ / (‖y‖ + ‖a‖)", ylim=(0, 1),
               title=f"THEORY §5: the MLP's share of a block's write\n{model}")
        cx.legend(loc="lower right")
    return {name: fig for name, (fig, _) in figures.items()}


def save_and_close(fig, path):
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)


def figure_writers(r, eps, rank, suffix=""):
    """{file name: write(tmp)} for write_files: each figure saved at 150 dpi, then closed."""
    return {f"{name}{suffix}.png": partial(save_and_close, fig)
            for name, fig in equivalence_figures(r, eps, rank).items()}
