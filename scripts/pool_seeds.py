"""Pool the held-out results of several runs (seeds) of one experiment and print the verdicts.

    python scripts/pool_seeds.py runs/smollm2-135m-cpu-experiment-seed* --out docs/results/thoughts-help.json

Every run must have been reported (scripts/report.py) on the same held-out documents; runs scored on different sets
are refused. Writes the JSON (keys ``seeds``, ``pooled`` and ``across_seeds``; see quietstar.report.pooling) and prints
a table. Other keys of an existing ``--out`` file (for example evaluations added by hand) are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from quietstar.report.pooling import pool_runs  # noqa: E402
from quietstar.report.stats import format_interval, verdict  # noqa: E402

POOLED_KEYS = ("heldout", "runs", "seeds", "pooled", "across_seeds")
DIFFERENCES = ("real_minus_null", "real_minus_shuffled", "real_minus_control", "no_thoughts_minus_base")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="Run folders, each reported by scripts/report.py.")
    p.add_argument("--out", required=True, help="Where to write the pooled JSON.")
    p.add_argument("--bootstrap", type=int, default=2000, help="Bootstrap resamples per interval.")
    args = p.parse_args(argv)
    try:
        result = pool_runs(args.runs, args.bootstrap)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"pool_seeds.py: error: {error}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    kept = {}
    if os.path.isfile(args.out):
        with open(args.out) as f:
            kept = {key: value for key, value in json.load(f).items() if key not in POOLED_KEYS}
    with open(args.out + ".tmp", "w") as f:
        json.dump({**result, **kept}, f, indent=2)
    os.replace(args.out + ".tmp", args.out)
    print("| run | " + " | ".join(f"{d} ({s})" for d in DIFFERENCES for s in ("all", "hardest")) + " |")
    print("|---|" + "---|" * (2 * len(DIFFERENCES)))
    rows = [*((f"seed {k}", v) for k, v in result["seeds"].items()), ("pooled (over documents)", result["pooled"])]
    if "across_seeds" in result:
        rows.append(("mean of seeds (t-interval over seeds)", result["across_seeds"]))
    for name, values in rows:
        cells = [f"{format_interval(values[f'{d}_{s}'])} {verdict(values[f'{d}_{s}'])}" if f"{d}_{s}" in values
                 else "—" for d in DIFFERENCES for s in ("all", "hardest")]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"written to {args.out}")
    return result


if __name__ == "__main__":
    main()
