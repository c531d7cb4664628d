"""Evaluate a finished run before and after training and write its report under the run folder.

    quietstar-report runs/smollm2-135m-cpu [--gsm8k-items 24] [--csqa-items 24] [--heldout-documents 24]
    (from a checkout: python scripts/report.py runs/smollm2-135m-cpu ...)

Reads what quietstar-train (scripts/train.py) left in the run folder (run_config.json, metrics.jsonl, train_results.json, the final
model) and writes:
  eval/<task>_<view>.json   GSM8K and CommonsenseQA, paper protocol, on the first items of each (a fixed subset),
                            for the base model (before), the trained LM without thoughts, the trained model with
                            w = 0, with null thoughts and with its own thoughts (these record the mixing weight);
  heldout_nll.json          held-out text NLL per view (quietstar.report.heldout: base model, trained without
                            thoughts, with real, other-document, causally shuffled and null thoughts, and the trained
                            controls given: --finetune-control, --finetune-flops-control, --null-trained-control;
                            those not given are stated missing), the paired differences with bootstrap 95 % intervals
                            over documents, overall and on the hardest 10 % chosen by a model outside each pair, and
                            by difficulty bin (the paper's figure); heldout_tokens.npz the per-token NLL and mixing
                            weight of every view (the raw data: pooling seeds, results tables);
  plots/*.png               training curves and the NLL change by token difficulty;
  thoughts.html             sample text with the thought behind every token;
  report.md, report.json    the tables and plots together.
"before" needs the pretrained base model of model_name_or_path; a run from a random model_config has none,
and its report leaves that view out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..assets import MATH_SPLITS, OFFLINE_MATH_HELDOUT, resolve_model
from ..modeling import QuietStarForCausalLM
from ..report.evaluations import run_evaluations
from ..checkpoint import is_quietstar_save
from ..report.controls import CONTROLS, check_control, flops_factor
from ..report.heldout import (binned_change, check_controls_differ, compare_views, controlled_scorers, fixed_windows,
                              heldout_token_nll, save_token_nll, summarize, token_documents, weight_summaries)
from ..report.markdown import render_report
from ..scoring import configure_for_scoring
from ..training.arguments import DataArguments
from ..training.data import load_documents
from ..training.run_files import read_metrics, read_run_config
from ..visualize import render_html


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="A run folder written by quietstar-train / scripts/train.py (its output_dir).")
    p.add_argument("--gsm8k-items", type=int, default=24, help="First N GSM8K test items (0: skip).")
    p.add_argument("--csqa-items", type=int, default=24, help="First N CommonsenseQA validation items (0: skip).")
    p.add_argument("--heldout-data", default=None, help="Held-out text (any `dataset` value of train.py). Default: "
                   f"{OFFLINE_MATH_HELDOUT} for runs trained on offline-math, else none.")
    p.add_argument("--heldout-documents", type=int, default=64, help="Held-out documents to score (0: skip); the "
                   "experiment uses 256 (configs/smollm2-135m-cpu-experiment.yaml).")
    p.add_argument("--finetune-control", default=None, help="Run folder of the plain-LM control: the same adapters, "
                   "data, seed and schedule trained without thoughts for the same steps. Not given: stated missing.")
    p.add_argument("--finetune-flops-control", default=None, help="Run folder of the plain-LM control trained for "
                   "equal FLOPs (the steps `python -m quietstar.training.compute RUN` prints). Not given: stated missing.")
    p.add_argument("--null-trained-control", default=None, help="Run folder of the Quiet-STaR control trained with "
                   "every thought fixed to filler (scored with filler). Not given: stated missing.")
    p.add_argument("--bootstrap", type=int, default=2000, help="Bootstrap resamples (over documents) per interval.")
    p.add_argument("--sample-tokens", type=int, default=48, help="Tokens generated for thoughts.html (0: skip).")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0, help="Seed of the thoughts sampled while evaluating.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def load_original(run_config: dict, device: str):
    """The pretrained base LM and tokenizer the run started from, or (None, None) for a random model_config."""
    name = run_config["ModelArguments"]["model_name_or_path"]
    if name is None:
        return None, None
    path = resolve_model(name)
    return (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval(),
            AutoTokenizer.from_pretrained(path))


def load_controls(args, run_config: dict) -> tuple[dict, dict]:
    """``(controls, models)``: what the report states about the trained controls (each given one checked against
    the run, quietstar.report.controls; the missing ones named; the equal-FLOPs factor) and the loaded models as
    heldout.controlled_scorers keywords."""
    given = {"finetune": args.finetune_control, "finetune_flops": args.finetune_flops_control,
             "null_trained": args.null_trained_control}
    controls = {"flops_factor": flops_factor(run_config), "given": {}, "missing": []}
    models = {}
    for view in CONTROLS:
        if given[view] is None:
            controls["missing"].append(view)
            continue
        controls["given"][view] = check_control(view, given[view], run_config).to_dict()
        if view == "null_trained":
            model = QuietStarForCausalLM.from_pretrained(given[view]).to(args.device).eval()
            configure_for_scoring(model)
            models["null_trained"] = model
        elif is_quietstar_save(given[view]):  # a plain-LM run saved with its (unused) thought machinery
            models[f"{view}_lm"] = QuietStarForCausalLM.from_pretrained(given[view]).to(args.device).eval().base
        else:
            models[f"{view}_lm"] = (AutoModelForCausalLM.from_pretrained(given[view], dtype=torch.float32)
                                    .to(args.device).eval())
    return controls, models


def heldout_source(args, run_config: dict) -> str | None:
    if args.heldout_data is not None:
        return args.heldout_data
    return OFFLINE_MATH_HELDOUT if MATH_SPLITS.get(run_config["DataArguments"]["dataset"]) == "train" else None


def thoughts_page(args, trained, windows: list[list[int]], path: str) -> str:
    """Generate up to ``--sample-tokens`` tokens (fewer where the text ends) after the first 24 tokens of the first
    held-out window; write the page."""
    prompt = torch.tensor([windows[0][:24]], device=args.device)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    out = trained.generate(prompt, max_new_tokens=args.sample_tokens, generator=generator)
    new, thoughts, mixing_weights = out.row(0)  # nothing past the end-of-sequence token
    page = render_html(trained.tokenizer, prompt[0].tolist(), new.tolist(), thoughts.tolist(),
                       mixing_weights.tolist(), title=f"Thoughts of {os.path.basename(args.run_dir)}")
    with open(path, "w") as f:
        f.write(page)
    return path


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    try:
        from ..report.plots import plot_all
    except ImportError as error:  # matplotlib is an optional extra
        sys.exit(f"quietstar-report needs matplotlib ({error}): pip install 'quietstar[plots]'.")
    run_config = read_run_config(args.run_dir)
    torch.manual_seed(args.seed)
    trained = QuietStarForCausalLM.from_pretrained(args.run_dir).to(args.device).eval()
    configure_for_scoring(trained)  # one thought per position; only the s = 0 prediction is scored: A = 1
    original_lm, original_tokenizer = load_original(run_config, args.device)
    evaluations = run_evaluations(args.run_dir, trained, original_lm, original_tokenizer,
                                  {"gsm8k": args.gsm8k_items, "commonsense_qa": args.csqa_items}, args.seed,
                                  args.batch_size, args.device, args.bootstrap)

    heldout, binned, windows, page = None, None, [], None
    source = heldout_source(args, run_config)
    if source is not None and args.heldout_documents > 0:
        documents = load_documents(DataArguments(dataset=source, num_documents=args.heldout_documents))
        windows = fixed_windows(documents, trained.tokenizer, run_config["DataArguments"]["max_length"],
                                min_tokens=3)  # A = 1 needs 3 tokens
        controls, models = load_controls(args, run_config)
        gap = int(run_config["QuietStarConfig"]["num_lookahead_tokens"]) + 1
        scorers = controlled_scorers(trained, original_lm, torch.Generator(device=args.device).manual_seed(args.seed),
                                     gap, **models)
        nll, weights = heldout_token_nll(windows, trained.pad_token_id, scorers, args.batch_size)
        check_controls_differ(nll)
        token_docs = token_documents(windows)
        controls |= {"causal_gap": gap}
        save_token_nll(os.path.join(args.run_dir, "heldout_tokens.npz"), nll, token_docs, windows, source, weights,
                       controls)
        summary = summarize(nll)
        heldout = {"source": source, "documents": len(windows), "tokens": summary["tokens"],
                   "scored": summary["scored"], "nll": summary["mean"], "mixing_weight": weight_summaries(weights),
                   "controls": controls,
                   "differences": compare_views(nll, token_docs, args.bootstrap, seed=args.seed)}
        binned = binned_change(nll)
        with open(os.path.join(args.run_dir, "heldout_nll.json"), "w") as f:
            json.dump({**heldout, "bins": binned}, f, indent=2)
    if args.sample_tokens > 0 and windows:
        page = thoughts_page(args, trained, windows, os.path.join(args.run_dir, "thoughts.html"))

    entries = read_metrics(args.run_dir)
    os.makedirs(os.path.join(args.run_dir, "plots"), exist_ok=True)
    plots = plot_all(entries, binned, os.path.join(args.run_dir, "plots"))
    train_path = os.path.join(args.run_dir, "train_results.json")
    train_metrics = {}
    if os.path.exists(train_path):
        with open(train_path) as f:
            train_metrics = json.load(f)
    name = os.path.basename(os.path.normpath(args.run_dir))
    text = render_report(name, run_config, train_metrics, evaluations, heldout, entries, plots, args.run_dir, page)
    with open(os.path.join(args.run_dir, "report.md"), "w") as f:
        f.write(text)
    summary = {"evaluations": {task: {view: evaluation.result.score for view, evaluation in views.items()}
                               for task, views in evaluations.items()},
               "heldout": heldout, "train": train_metrics, "plots": plots}
    with open(os.path.join(args.run_dir, "report.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(text)
    print(f"\nReport written to {os.path.join(args.run_dir, 'report.md')}")
    return summary


def cli() -> None:
    """The console script: :func:`main` without its return value (which would become the exit status)."""
    main()


if __name__ == "__main__":
    main()
