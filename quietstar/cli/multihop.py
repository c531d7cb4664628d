"""Score the multi-hop task's six views (quietstar.report.multihop): do a model's learned thoughts carry content?

    python scripts/multihop_eval.py --model runs/smollm2-135m-multihop --hops 1 2 3 --documents 100 \\
        --output runs/smollm2-135m-multihop/multihop.json

``--model`` is a Quiet-STaR folder, or a plain LM (a folder, hub id or offline name such as ``smollm2-135m``),
which is wrapped untrained (fresh thought embeddings, a zero mixing head) and labelled ``untrained`` in the record:
then gold - null says whether the untrained reader can use an inserted intermediate at all. Writes the JSON record
to ``--output`` and its markdown table beside it (``.md``), and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import torch

from ..config import QuietStarConfig
from ..report.multihop import MultihopEvalSettings, evaluate_multihop, markdown_table
from ..evaluation.run import DTYPES, default_device, load_model
from ..scoring import configure_for_scoring

DEFAULTS = {f.name: f.default for f in dataclasses.fields(MultihopEvalSettings)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Quiet-STaR folder, or a plain LM to wrap untrained.")
    p.add_argument("--hops", type=int, nargs="+", default=list(DEFAULTS["hops"]), help="The k to score.")
    p.add_argument("--documents", type=int, default=DEFAULTS["num_documents"], help="Held-out documents per k.")
    p.add_argument("--entities", type=int, default=DEFAULTS["num_entities"], help="Entities per document.")
    p.add_argument("--queries", type=int, default=DEFAULTS["num_queries"], help="Queries per document.")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="Seed of the held-out documents.")
    p.add_argument("--sampling-seed", type=int, default=DEFAULTS["sampling_seed"], help="Seed of the thoughts' draw.")
    p.add_argument("--greedy-thoughts", action="store_true", help="Think greedily instead of sampling.")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="Documents per forward call.")
    p.add_argument("--num-thought-tokens", type=int, default=None, help="T (default: the checkpoint's; the library "
                   "default for a plain LM).")
    p.add_argument("--thought-init-text", default=None, help="A plain LM only: the text whose first token starts the "
                   "thought embeddings and fills null thoughts (default: QuietStarConfig's).")
    p.add_argument("--device", default=default_device())
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--output", required=True, help="Where to write the JSON record (the table goes to .md beside it).")
    return p


def load(args):
    """``(model, untrained)``: the Quiet-STaR model to score, set up for scoring, and whether it was wrapped here."""
    model, lm, tokenizer = load_model(args.model, baseline=True, device=args.device, dtype=getattr(torch, args.dtype))
    untrained = model is None
    if untrained:
        from ..modeling import QuietStarForCausalLM

        overrides = {"thought_init_text": args.thought_init_text} if args.thought_init_text is not None else {}
        model = QuietStarForCausalLM.from_base(lm, tokenizer, QuietStarConfig(**overrides)).to(args.device).eval()
    elif args.thought_init_text is not None:
        raise ValueError("--thought-init-text applies to a plain LM only; a Quiet-STaR folder keeps its own.")
    configure_for_scoring(model, num_thoughts=1, num_thought_tokens=args.num_thought_tokens)
    return model, untrained


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = MultihopEvalSettings(hops=tuple(args.hops), num_documents=args.documents,
                                        num_entities=args.entities, num_queries=args.queries, seed=args.seed,
                                        sampling_seed=args.sampling_seed, greedy_thoughts=args.greedy_thoughts,
                                        batch_size=args.batch_size)
        model, untrained = load(args)
    except (ValueError, FileNotFoundError) as error:
        parser.exit(2, f"error: {error}\n")
    torch.manual_seed(settings.sampling_seed)
    result = evaluate_multihop(model, settings)
    result |= {"model": args.model, "untrained": untrained, "quietstar_config": model.quietstar_config.to_dict()}
    table = f"Multi-hop views of {args.model}{' (untrained)' if untrained else ''}\n\n" + markdown_table(result)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.splitext(args.output)[0] + ".md", "w") as f:
        f.write(table + "\n")
    print(table)
    return result


if __name__ == "__main__":
    main()
