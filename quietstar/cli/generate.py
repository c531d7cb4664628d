"""Generate text with a Quiet-STaR model, thinking before every token.

    quietstar-generate --model runs/tiny-cpu --prompt "12 + 7 =" --max-new-tokens 32 --show-thoughts
    quietstar-generate --model PATH --prompt-file q.txt --do-sample --temperature 0.8 --html thoughts.html
    (from a checkout: python scripts/generate.py ...)

--show-thoughts prints each thought inline before its token (coloured in a terminal); --html writes a page
with the same view (default beside nothing: give a path). Generation stops at the tokenizer's end-of-sequence
token, and nothing after it is shown.
"""

from __future__ import annotations

import argparse
import sys

import torch

from ..modeling import QuietStarForCausalLM
from ..visualize import render_html, render_terminal


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="A folder written by save_pretrained / train.py.")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="The prompt text.")
    prompt.add_argument("--prompt-file", help="A file holding the prompt text.")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--do-sample", action="store_true", help="Sample text tokens (default: greedy).")
    parser.add_argument("--temperature", type=float, default=1.0, help="Temperature of the text tokens.")
    parser.add_argument("--greedy-thoughts", action="store_true", help="Think greedily instead of sampling.")
    parser.add_argument("--show-thoughts", action="store_true", help="Print each thought before its token.")
    parser.add_argument("--html", help="Write an HTML view of the text and its thoughts to this path.")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    model = QuietStarForCausalLM.from_pretrained(args.model).eval()
    tokenizer = model.tokenizer
    if args.prompt is not None:
        text = args.prompt
    else:
        with open(args.prompt_file) as f:
            text = f.read()
    prompt_ids = tokenizer(text, return_tensors="pt").input_ids
    out = model.generate(prompt_ids, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                         temperature=args.temperature, greedy_thoughts=args.greedy_thoughts,
                         generator=torch.Generator().manual_seed(args.seed), eos_token_id=tokenizer.eos_token_id)
    new_ids, thoughts, mixing_weights = out.row(0)  # up to and including the EOS, if it came
    if args.show_thoughts:
        print(render_terminal(tokenizer, prompt_ids[0], new_ids, thoughts, color=sys.stdout.isatty()))
    else:
        print(tokenizer.decode(torch.cat([prompt_ids[0], new_ids])))
    if args.html:
        with open(args.html, "w") as f:
            f.write(render_html(tokenizer, prompt_ids[0], new_ids, thoughts, mixing_weights))
        print(f"Wrote {args.html}", file=sys.stderr)


if __name__ == "__main__":
    main()
