"""Tokens per second of thought-aware generation: cached (ours) vs the recompute-everything definition.

    python bench/generate.py --new-tokens 256 --prompt-tokens 64 512 [--hidden 576 --layers 30 ...]

Both think T sampled thought tokens before every new token. The definition
(quietstar.generation.generate_reference) reruns the model from scratch on the whole sequence for every
thought token and every text token; ours keeps the context's K/V cache and thinks into scratch slots it
crops afterwards. Random Llama weights (speed does not depend on them), fp32, CPU, batch 1. The gain
grows with the context: the definition reruns the whole context T + 2 times per new token, the cached
path feeds single tokens; so the table has one row pair per prompt length.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from quietstar import QuietStarConfig, QuietStarForCausalLM
from quietstar.generation import generate_reference
from quietstar.tiny import byte_tokenizer, tiny_model


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--thought-tokens", type=int, default=9)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="Write the results as JSON here.")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer = byte_tokenizer()
    base = tiny_model("llama", vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads)
    model = QuietStarForCausalLM.from_base(base, tokenizer, QuietStarConfig(num_thought_tokens=args.thought_tokens))
    model.eval()
    rows = []
    for prompt_tokens in args.prompt_tokens:
        prompt = torch.randint(0, 256, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
        # eos_token_id=[]: both produce all new_tokens tokens, however early the random model says its EOS.
        for name, run in [
            ("cached (ours)", lambda: model.generate(prompt, max_new_tokens=args.new_tokens, eos_token_id=[],
                                                     generator=torch.Generator().manual_seed(0))),
            ("recompute everything", lambda: generate_reference(model, prompt, max_new_tokens=args.new_tokens,
                                                                eos_token_id=[],
                                                                generator=torch.Generator().manual_seed(0))),
        ]:
            start = time.perf_counter()
            run()
            seconds = time.perf_counter() - start
            rows.append({"prompt_tokens": prompt_tokens, "method": name, "seconds": seconds,
                         "tokens_per_second": args.new_tokens / seconds})
            print(f"prompt {prompt_tokens:5d} {name:>22}: {seconds:8.2f} s, {args.new_tokens / seconds:8.2f} tokens/s",
                  flush=True)
    print(f"\nrandom Llama hidden {args.hidden}, {args.layers} layers, {args.heads} heads, T = {args.thought_tokens}, "
          f"{args.new_tokens} new tokens, fp32, {args.threads} CPU threads\n")
    print("| prompt | method | seconds | tokens/s | speedup |\n|---:|---|---:|---:|---:|")
    for cached, reference in zip(rows[::2], rows[1::2]):
        speedup = reference["seconds"] / cached["seconds"]
        cached["speedup"] = speedup
        for row in (cached, reference):
            print(f"| {row['prompt_tokens']} | {row['method']} | {row['seconds']:.2f} | {row['tokens_per_second']:.2f} | "
                  f"{speedup if row is cached else 1.0:.1f}x |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
