"""Evaluate a finished run before and after training and write its report under the run folder.

    python scripts/report.py runs/smollm2-135m-cpu [--gsm8k-items 24] [--csqa-items 24] [--heldout-documents 24]

Reads what scripts/train.py left in the run folder (run_config.json, metrics.jsonl, train_results.json, the final
model) and writes:
  eval/<task>_<view>.json   GSM8K and CommonsenseQA, paper protocol, on the first items of each (a fixed subset),
                            for the base model (before), the trained LM without thoughts, and with thoughts;
  heldout_nll.json          held-out text NLL per view, overall and on the hardest 10 % of tokens, and by
                            difficulty bin (the paper's figure);
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from eval.data import load_task  # noqa: E402
from eval.run import build_parser as eval_parser  # noqa: E402
from eval.run import configure_for_eval, evaluate  # noqa: E402
from quietstar import QuietStarForCausalLM  # noqa: E402
from quietstar.assets import MATH_SPLITS, OFFLINE_MATH_HELDOUT, resolve_model  # noqa: E402
from quietstar.report.heldout import (binned_change, fixed_windows, heldout_token_nll, standard_scorers,  # noqa: E402
                                      summarize)
from quietstar.report.markdown import render_report  # noqa: E402
try:
    from quietstar.report.plots import plot_all  # noqa: E402
except ImportError as error:  # matplotlib is an optional extra
    sys.exit(f"scripts/report.py needs matplotlib ({error}): pip install 'quietstar[plots]'.")
from quietstar.training.arguments import DataArguments  # noqa: E402
from quietstar.training.data import load_documents  # noqa: E402
from quietstar.training.run_files import read_metrics, read_run_config  # noqa: E402
from quietstar.visualize import render_html  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="A run folder written by scripts/train.py (its output_dir).")
    p.add_argument("--gsm8k-items", type=int, default=24, help="First N GSM8K test items (0: skip).")
    p.add_argument("--csqa-items", type=int, default=24, help="First N CommonsenseQA validation items (0: skip).")
    p.add_argument("--heldout-data", default=None, help="Held-out text (any `dataset` value of train.py). Default: "
                   f"{OFFLINE_MATH_HELDOUT} for runs trained on offline-math, else none.")
    p.add_argument("--heldout-documents", type=int, default=24, help="Held-out documents to score (0: skip).")
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


def run_evaluations(args, trained, original_lm, original_tokenizer) -> dict:
    """{task: {view: eval.run results}} on the first items of each task, written under run_dir/eval/."""
    evaluations = {}
    for task, items in (("gsm8k", args.gsm8k_items), ("commonsense_qa", args.csqa_items)):
        if items <= 0:
            continue
        rows, source = load_task(task, items)
        views = {"after_thoughts": (args.run_dir, trained, trained.base, trained.tokenizer, False),
                 "after_no_thoughts": (args.run_dir, trained, trained.base, trained.tokenizer, True)}
        if original_lm is not None:
            views["before"] = (original_lm.name_or_path, None, original_lm, original_tokenizer, True)
        evaluations[task] = {}
        for view, (name, model, lm, tokenizer, baseline) in views.items():
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            flags = ["--model", name, "--task", task, "--protocol", "paper", "--limit", str(items),
                     "--seed", str(args.seed), "--batch-size", str(args.batch_size), "--device", args.device,
                     "--output", os.path.join(args.run_dir, "eval", f"{task}_{view}.json")]
            eval_args = eval_parser().parse_args(flags + (["--baseline"] if baseline else []))
            evaluations[task][view] = evaluate(eval_args, (rows, source, model, lm, tokenizer))
            print(f"{task} {view}: {evaluations[task][view]['score']:.4f}")
    return evaluations


def heldout_source(args, run_config: dict) -> str | None:
    if args.heldout_data is not None:
        return args.heldout_data
    return OFFLINE_MATH_HELDOUT if MATH_SPLITS.get(run_config["DataArguments"]["dataset"]) == "train" else None


def thoughts_page(args, trained, windows: list[list[int]], path: str) -> str:
    """Generate ``--sample-tokens`` tokens after the first 24 tokens of the first held-out window; write the page."""
    prompt = torch.tensor([windows[0][:24]], device=args.device)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    out = trained.generate(prompt, max_new_tokens=args.sample_tokens, generator=generator)
    new = out.sequences[0, prompt.shape[1]:].tolist()
    page = render_html(trained.tokenizer, prompt[0].tolist(), new, out.thoughts[0].tolist(),
                       out.mixing_weights[0].tolist(), title=f"Thoughts of {os.path.basename(args.run_dir)}")
    with open(path, "w") as f:
        f.write(page)
    return path


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    run_config = read_run_config(args.run_dir)
    torch.manual_seed(args.seed)
    trained = QuietStarForCausalLM.from_pretrained(args.run_dir).to(args.device).eval()
    configure_for_eval(trained)  # scoring needs the s = 0 prediction only: A = 1
    original_lm, original_tokenizer = load_original(run_config, args.device)
    evaluations = run_evaluations(args, trained, original_lm, original_tokenizer)

    heldout, binned, windows, page = None, None, [], None
    source = heldout_source(args, run_config)
    if source is not None and args.heldout_documents > 0:
        documents = load_documents(DataArguments(dataset=source, num_documents=args.heldout_documents))
        windows = fixed_windows(documents, trained.tokenizer, run_config["DataArguments"]["max_length"],
                                min_tokens=3)  # A = 1 needs 3 tokens
        scorers = standard_scorers(trained, original_lm,
                                   torch.Generator(device=args.device).manual_seed(args.seed))
        if original_lm is None:
            scorers.pop("before")
        nll = heldout_token_nll(windows, trained.pad_token_id, scorers, args.batch_size)
        reference = "before" if "before" in nll else "after_no_thoughts"
        heldout, binned = summarize(nll, reference=reference), binned_change(nll, reference=reference)
        with open(os.path.join(args.run_dir, "heldout_nll.json"), "w") as f:
            json.dump({"source": source, "documents": len(windows), **heldout, "bins": binned}, f, indent=2)
    if args.sample_tokens > 0 and windows:
        page = thoughts_page(args, trained, windows, os.path.join(args.run_dir, "thoughts.html"))

    entries = read_metrics(args.run_dir)
    os.makedirs(os.path.join(args.run_dir, "plots"), exist_ok=True)
    plots = plot_all(entries, binned, os.path.join(args.run_dir, "plots"))
    train_path = os.path.join(args.run_dir, "train_results.json")
    train_metrics = json.load(open(train_path)) if os.path.exists(train_path) else {}
    name = os.path.basename(os.path.normpath(args.run_dir))
    text = render_report(name, run_config, train_metrics, evaluations, heldout, entries, plots, args.run_dir, page)
    with open(os.path.join(args.run_dir, "report.md"), "w") as f:
        f.write(text)
    summary = {"evaluations": {task: {view: r["score"] for view, r in views.items()}
                               for task, views in evaluations.items()},
               "heldout": heldout, "train": train_metrics, "plots": plots}
    with open(os.path.join(args.run_dir, "report.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(text)
    print(f"\nReport written to {os.path.join(args.run_dir, 'report.md')}")
    return summary


if __name__ == "__main__":
    main()
