"""
docs/draw_block.py: draws one pre-norm transformer block with its six steering sites (THEORY §1)
to docs/block.png. The README and notebook 1 show the picture.

    python docs/draw_block.py
"""
import os
import sys
from functools import partial

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyBboxPatch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # model.py
from machinery.files import write_atomically  # noqa: E402

STREAM, BRANCH = 1.0, 4.6          # x of the residual stream and of the sublayers
SITE_COLOR, BOX_COLOR = "#c0392b", "#eaf2fb"

# (site, where its slot sits, the paper's name or "", what it holds), in the order data flows
SITES = [("attn_out", (BRANCH, 7.85), "pre-MLP", "a = Attn(N1(x))"),
         ("resid_mid", (STREAM, 6.85), "", "p = x + a"),
         ("mlp_in", (BRANCH, 5.55), "", "h = N2(p)"),
         ("mlp_hidden", (BRANCH, 3.95), "", "m = φ(h)"),
         ("mlp_out", (BRANCH, 2.35), "post-MLP", "y = W_proj m + b_proj"),
         ("block_out", (STREAM, 1.05), "post-block", "z = p + y")]

# the sublayers: (label, centre y)
BOXES = [("N1: LayerNorm / RMSNorm", 9.45), ("Attn (c_attn, c_proj)", 8.55),
         ("N2: LayerNorm / RMSNorm", 6.15), ("c_fc (+ c_gate), then φ\ngelu(u), or silu(g) ⊙ u", 4.75),
         ("c_proj  (W_proj)", 3.2)]


def arrow(ax, start, end):
    ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle="-|>", lw=1.4, color="0.25"))


def box(ax, label, y):
    ax.add_patch(FancyBboxPatch((BRANCH - 2.2, y - 0.3), 4.4, 0.6, boxstyle="round,pad=0.04",
                                facecolor=BOX_COLOR, edgecolor="0.3", lw=1.2))
    ax.text(BRANCH, y, label, ha="center", va="center", fontsize=12)


def plus(ax, y):
    ax.add_patch(plt.Circle((STREAM, y), 0.2, facecolor="white", edgecolor="0.25", lw=1.4,
                            zorder=3))
    ax.text(STREAM, y - 0.02, "+", ha="center", va="center", fontsize=14, zorder=4)


def site(ax, name, xy, paper, formula):
    x, y = xy
    ax.plot(x, y, "o", ms=11, color=SITE_COLOR, zorder=5)
    label = name + (f" ({paper})" if paper else "")
    dx = 2.35 if x == BRANCH else -0.35
    ax.text(x + dx, y + 0.09, label, ha="left" if dx > 0 else "right", va="center", fontsize=12,
            family="monospace", weight="bold", color=SITE_COLOR)
    ax.text(x + dx, y - 0.2, formula, ha="left" if dx > 0 else "right", va="center", fontsize=12,
            color="0.2")


def draw(path):
    fig, ax = plt.subplots(figsize=(8.0, 8.6))
    ax.set(xlim=(-2.2, 9.8), ylim=(0.0, 10.4))
    ax.axis("off")
    # the residual stream: x enters at the top, z leaves at the bottom
    ax.text(STREAM, 10.15, "x  (stream entering the block)", ha="center", fontsize=12)
    arrow(ax, (STREAM, 9.95), (STREAM, 7.65))
    arrow(ax, (STREAM, 7.25), (STREAM, 2.05))
    arrow(ax, (STREAM, 1.65), (STREAM, 0.35))
    ax.text(STREAM + 0.15, 0.2, "z  (stream leaving the block)", ha="left", fontsize=12)
    ax.text(STREAM - 0.25, 4.5, "skip path", rotation=90, ha="right", va="center", fontsize=12,
            style="italic", color="0.35")
    # attention branch
    arrow(ax, (STREAM, 9.45), (BRANCH - 2.25, 9.45))
    for label, y in BOXES:
        box(ax, label, y)
    arrow(ax, (BRANCH, 9.14), (BRANCH, 8.86))
    ax.plot([BRANCH, BRANCH], [8.26, 7.45], color="0.25", lw=1.4)
    arrow(ax, (BRANCH, 7.45), (STREAM + 0.22, 7.45))
    plus(ax, 7.45)
    # MLP branch
    arrow(ax, (STREAM, 6.15), (BRANCH - 2.25, 6.15))
    arrow(ax, (BRANCH, 5.86), (BRANCH, 5.1))
    arrow(ax, (BRANCH, 4.4), (BRANCH, 3.5))
    ax.plot([BRANCH, BRANCH], [2.91, 1.85], color="0.25", lw=1.4)
    arrow(ax, (BRANCH, 1.85), (STREAM + 0.22, 1.85))
    plus(ax, 1.85)
    for name, xy, paper, formula in SITES:
        site(ax, name, xy, paper, formula)
    ax.set_title("One pre-norm block and its six steering sites (THEORY §1)\n"
                 "a slot at each red dot replaces s by s + Δ(s)", fontsize=13)
    write_atomically(path, partial(fig.savefig, dpi=150, bbox_inches="tight"))   # all or nothing


if __name__ == "__main__":
    draw(os.path.join(os.path.dirname(os.path.abspath(__file__)), "block.png"))
