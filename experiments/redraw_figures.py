"""
experiments/redraw_figures.py: where equivalence.py's results go, and how they look: the output folder checked
before any work, paths printed relative to the repository, the JSON, and the three figures drawn
for a slide (12-pt text on a 7.5-inch figure saved at 150 dpi: 1,125 px wide, readable on a
1280-px projector). Every file is written through model.write_files by the caller.

Redraw the figures of a committed equivalence.json (e.g. SmolLM2's) without rerunning it:

    python experiments/redraw_figures.py results/smollm2/equivalence.json docs --suffix _smollm2
"""
import json
import os
import sys
from functools import partial
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:                   # run as a script: model.py is one folder up
    sys.path.insert(0, str(ROOT))
from model import write_files  # noqa: E402
from machinery.runtime import OneLineParser, check_out_dir  # noqa: E402
from experiments.fits import KINDS, RANK, SITES  # noqa: E402

SLIDE = {"font.size": 12}                       # every text of a figure: 12 pt or more


def shown(path):
    """A path as printed and recorded: relative to the repository root when inside it."""
    full = os.path.abspath(path)
    return os.path.relpath(full, ROOT) if full.startswith(str(ROOT) + os.sep) else path


def equivalence_figures(r, eps):
    """-> {name: figure}: first_order (THEORY §4), sites (§4–§5), mlp_share (§5)."""
    with plt.rc_context(SLIDE):
        names = ("first_order", "sites", "mlp_share")
        figures = {name: plt.subplots(figsize=(7.5, 4.5)) for name in names}
        ax, bx, cx = (axes for _, axes in figures.values())
        for kind, f in r["first_order"].items():
            ax.loglog(eps, f["errors"], "o-", label=f"{kind}, ε·jvp: slope {f['slope']:.2f}")
            ax.loglog(eps, f["control_errors"], "s--",
                      label=f"{kind}, no ΔW_proj·m: slope {f['control_slope']:.2f}")
        ax.set(xlabel="update size ε", ylabel="max |z(θ+εΔ) − z(θ) − ε·pred.|",
               title="THEORY §4: first-order error")
        ax.legend()
        for i, kind in enumerate(KINDS):
            bx.bar(np.arange(len(SITES)) + 0.27 * (i - 1),
                   [r["site_recovery"][s][kind] for s in SITES], 0.27, label=kind)
        bx.set(xticks=range(len(SITES)), xticklabels=SITES, ylabel="share of δz recovered",
               ylim=(0, 1.25), title=f"THEORY §4–§5: where to steer (rank {RANK})")
        bx.legend(ncol=3, loc="upper center")
        cx.plot(r["mlp_share"], "o-", label=f"{r['model']}, {r['tokens']} tokens")
        cx.set(xlabel="layer ℓ", ylabel="MLP share_ℓ = ‖y‖ / (‖y‖ + ‖a‖)", ylim=(0, 1),
               title="THEORY §5: the MLP's share of a block's write")
        cx.legend(loc="lower right")
    return {name: fig for name, (fig, _) in figures.items()}


def save_and_close(fig, path):
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)


def figure_writers(r, eps, suffix=""):
    """{file name: write(tmp)} for model.write_files: each figure saved at 150 dpi, then closed."""
    return {f"{name}{suffix}.png": partial(save_and_close, fig)
            for name, fig in equivalence_figures(r, eps).items()}


def main(argv=None):
    parser = OneLineParser(description="Redraw the figures of an equivalence.json.")
    parser.add_argument("json", help="an equivalence.json, e.g. results/smollm2/equivalence.json")
    parser.add_argument("out", help="folder for first_order, sites and mlp_share .png")
    parser.add_argument("--suffix", default="",
                        help="added to each name: _smollm2 gives mlp_share_smollm2.png")
    args = parser.parse_args(argv)
    check_out_dir(args.out, flag="out")
    try:
        r = json.loads(Path(args.json).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{args.json}: cannot read it as JSON ({e})") from None
    plt.switch_backend("Agg")
    from equivalence import EPS         # (here: equivalence.py imports this module)
    writers = figure_writers(r, EPS, args.suffix)
    write_files(args.out, writers)
    print(f"wrote {', '.join(writers)} into {shown(args.out)}")


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        print(f"experiments/redraw_figures.py: error: {e}", file=sys.stderr)
        sys.exit(2)
