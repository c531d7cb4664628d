"""Pool the held-out results of several runs (seeds) of one experiment: commit their raw data and regenerate the tables.

    python scripts/pool_seeds.py runs/smollm2-135m-cpu-experiment-seed* --name thoughts-help

Every run must have been reported (scripts/report.py) on the same held-out documents, with the same views; other
runs are refused. Writes the raw data, ``docs/results/<name>.tokens.npz`` (the per-token NLL and mixing weight of
every view of every run: quietstar.report.pooling.save_bundle), then regenerates from the committed raw data alone
everything scripts/results_tables.py writes: ``docs/results/<name>.json`` and the tables of the results page.
With ``--offdomain`` it also commits each run's GSM8K and CommonsenseQA records (``eval/*.json`` and
``run_config.json``) to ``docs/results/offdomain/<name>/seed<k>/`` (quietstar.report.offdomain_table).
With ``--extend`` the runs join the seeds already committed under ``<name>`` (trained on another machine or in an
earlier session, their run folders gone) instead of replacing them:

    python scripts/pool_seeds.py runs/mix/prior-mixed-seed1 runs/mix/prior-mixed-seed2 --name math-mix-prior-mixed \
        --offdomain --extend

With ``--offdomain-only`` the runs' off-domain records are committed beside the experiment's other seeds (runs
reported with ``--heldout-documents 0``, which leave no held-out data); the bundle is left as it is.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from quietstar.report.offdomain_table import OFFDOMAIN_DIR  # noqa: E402
from quietstar.report.pooling import extend_runs, load_bundle, load_runs, run_seed, save_bundle  # noqa: E402
from quietstar.report.tables import BUNDLE_SUFFIX, regenerate  # noqa: E402
from quietstar.training.run_files import METRICS_FILE  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def copy_offdomain(run_dir: str, folder: str) -> None:
    """Copy the run's evaluation records, run_config.json and training logs (metrics.jsonl, for w over training) into
    ``folder`` (replacing what it held)."""
    records = sorted(glob.glob(os.path.join(run_dir, "eval", "*.json")))
    if not records:
        sys.exit(f"pool_seeds.py: error: {run_dir}/eval holds no evaluation records; report the run with "
                 "--gsm8k-items / --csqa-items first, or leave out --offdomain.")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    for path in [*records, os.path.join(run_dir, "run_config.json")]:
        shutil.copy(path, folder)
    metrics = os.path.join(run_dir, METRICS_FILE)
    if os.path.isfile(metrics):
        shutil.copy(metrics, folder)


def main(argv=None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="Run folders, each reported by scripts/report.py.")
    p.add_argument("--name", required=True, help="The experiment's name: docs/results/<name>.tokens.npz and .json.")
    p.add_argument("--results-dir", default=os.path.join(REPO, "docs", "results"))
    p.add_argument("--page", default=os.path.join(REPO, "docs", "results.md"), help="The page the tables go into.")
    p.add_argument("--readme", default=None,
                   help="A page whose <!-- generated:summary:NAME --> blocks get experiment NAME's headline table "
                        "(default: the repository's README.md when --results-dir is the repository's, else none).")
    p.add_argument("--offdomain", action="store_true",
                   help="Also commit each run's GSM8K / CommonsenseQA evaluation records (its eval/ folder).")
    p.add_argument("--extend", action="store_true",
                   help="Add the runs to the seeds already committed in docs/results/<name>.tokens.npz (kept as they "
                        "are, with their off-domain records) instead of replacing the bundle.")
    p.add_argument("--offdomain-only", action="store_true",
                   help="Commit only the runs' GSM8K / CommonsenseQA records, beside the seeds already committed "
                        "(runs reported without a held-out set); the bundle is left as it is.")
    args = p.parse_args(argv)
    if args.readme is None and os.path.abspath(args.results_dir) == os.path.join(REPO, "docs", "results"):
        args.readme = os.path.join(REPO, "README.md")
    if args.offdomain_only:
        for run_dir in args.runs:
            seed_folder = f"seed{run_seed(run_dir)}"
            copy_offdomain(run_dir, os.path.join(args.results_dir, OFFDOMAIN_DIR, args.name, seed_folder))
        return finish(args)
    bundle = os.path.join(args.results_dir, args.name + BUNDLE_SUFFIX)
    if args.extend and not os.path.isfile(bundle):
        sys.exit(f"pool_seeds.py: error: --extend adds to {bundle}, which does not exist; pool without --extend.")
    try:
        added = load_runs(args.runs)
        runs = extend_runs(load_bundle(bundle), bundle, added) if args.extend else added
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"pool_seeds.py: error: {error}")
    save_bundle(bundle, runs)
    if args.offdomain:
        if not args.extend:  # the bundle was replaced: so are the records of seeds it no longer holds
            shutil.rmtree(os.path.join(args.results_dir, OFFDOMAIN_DIR, args.name), ignore_errors=True)
        for seed, run in added["seeds"].items():
            copy_offdomain(run["run"], os.path.join(args.results_dir, OFFDOMAIN_DIR, args.name, f"seed{seed}"))
    return finish(args)


def finish(args) -> list[str]:
    """Regenerate everything written from the committed raw data; say what changed."""
    changed = regenerate(args.results_dir, args.page, summary_page_path=args.readme)
    print("\n".join(f"written: {path}" for path in changed) or "nothing changed")
    return changed


if __name__ == "__main__":
    main()
