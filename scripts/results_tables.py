"""Regenerate every results table from the committed raw data (docs/results/*.tokens.npz, docs/results/multihop/*.json).

    python scripts/results_tables.py            # write docs/results/<name>.json, the tables of docs/results.md and
                                                # the README's summary blocks
    python scripts/results_tables.py --check    # exit 1 when a generated file is stale (tests/test_results_tables.py)

The tables go between ``<!-- generated:<name> -->`` markers of the page; text outside them is left alone
(quietstar.report.tables). The multi-hop and off-domain blocks also redraw their figures (docs/results/multihop/arms.png,
docs/results/offdomain/w_vs_change.png) when the block changes; ``--check`` compares text only (a missing figure is
reported, PNG bytes are never compared).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from quietstar.report.tables import regenerate  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results-dir", default=os.path.join(REPO, "docs", "results"))
    p.add_argument("--page", default=os.path.join(REPO, "docs", "results.md"))
    p.add_argument("--readme", default=None,
                   help="A page whose <!-- generated:summary:NAME --> blocks get experiment NAME's headline table "
                        "(default: the repository's README.md when --results-dir is the repository's, else none).")
    p.add_argument("--check", action="store_true", help="Write nothing; exit 1 when a generated file is stale.")
    args = p.parse_args(argv)
    if args.readme is None and os.path.abspath(args.results_dir) == os.path.join(REPO, "docs", "results"):
        args.readme = os.path.join(REPO, "README.md")
    stale = regenerate(args.results_dir, args.page, check=args.check, summary_page_path=args.readme)
    for path in stale:
        print(f"{'stale' if args.check else 'written'}: {os.path.relpath(path, REPO)}")
    if args.check and stale:
        sys.exit(1)
    return stale


if __name__ == "__main__":
    main()
