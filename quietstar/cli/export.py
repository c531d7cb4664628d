"""Export a Quiet-STaR checkpoint as a Hub-ready folder with a model card, and optionally push it.

    quietstar-export CHECKPOINT OUT [--merge-lora] [--push-to-hub REPO [--private]] [--overwrite]
                     [--eval-results FILE ...] [--base-model HUB_ID] [--license ID]
    (from a checkout: python scripts/export.py CHECKPOINT OUT ...)

OUT loads with stock ``transformers.AutoModelForCausalLM`` (a plain LM) and with
``quietstar.QuietStarForCausalLM.from_pretrained`` (the thinking model). What goes in it and the LoRA layout that
``--merge-lora`` expects are described in ``quietstar/hub.py``. On bad input the command exits non-zero with a
one-line error.
"""

from __future__ import annotations

import argparse
import sys

from transformers.utils import logging as transformers_logging

from ..hub import ExportError, export, push_to_hub


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a folder written by QuietStarForCausalLM.save_pretrained / the trainer")
    parser.add_argument("out", help="the folder to create")
    parser.add_argument("--merge-lora", action="store_true",
                        help="merge the LoRA adapter in CHECKPOINT/adapter/ into the exported LM")
    parser.add_argument("--push-to-hub", metavar="REPO", help="after exporting, upload OUT to this Hub repository")
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--eval-results", nargs="+", default=[], metavar="FILE",
                        help="results JSON files of quietstar-eval (eval/run.py) for the model card")
    parser.add_argument("--base-model", metavar="HUB_ID", help="the model Quiet-STaR training started from")
    parser.add_argument("--license", metavar="ID", help="license identifier for the model card, e.g. apache-2.0")
    args = parser.parse_args(argv)
    if args.private and not args.push_to_hub:
        parser.error("--private needs --push-to-hub")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    transformers_logging.disable_progress_bar()  # keep the output to its result lines
    try:
        path = export(args.checkpoint, args.out, merge_lora=args.merge_lora, overwrite=args.overwrite,
                      eval_results=args.eval_results, base_model=args.base_model, license=args.license,
                      repo_id=args.push_to_hub)
        print(f"Exported {args.checkpoint} to {path}")
        if args.push_to_hub:
            print(f"Pushed to {push_to_hub(path, args.push_to_hub, private=args.private)}")
    except ExportError as error:
        sys.exit(f"export.py: error: {error}")


if __name__ == "__main__":
    main()
