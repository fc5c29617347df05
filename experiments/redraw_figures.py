"""
experiments/redraw_figures.py: redraw the three figures of `python equivalence.py` (first_order,
sites, mlp_share) from a committed equivalence.json, without rerunning it; e.g. SmolLM2's, which
takes minutes to compute:

    python experiments/redraw_figures.py results/smollm2/equivalence.json docs --suffix _smollm2
"""
import json
import sys
from pathlib import Path

import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:                   # run as a script: the core is one folder up
    sys.path.insert(0, str(ROOT))
from equivalence import EPS, RANK  # noqa: E402
from machinery.checks import OneLineParser, check_out_dir  # noqa: E402
from machinery.figures import figure_writers  # noqa: E402
from machinery.files import shown, write_files  # noqa: E402


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
    writers = figure_writers(r, EPS, RANK, args.suffix)
    write_files(args.out, writers)
    print(f"wrote {', '.join(writers)} into {shown(args.out)}")


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        print(f"experiments/redraw_figures.py: error: {e}", file=sys.stderr)
        sys.exit(2)
