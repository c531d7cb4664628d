"""The ``lm_eval`` command line with ``--model quietstar`` registered (quietstar/evaluation/lm_eval_model.py).

    quietstar-lm-eval run --model quietstar --model_args pretrained=runs/ckpt,greedy_thoughts=True --tasks arc_easy
    (from a checkout: python -m eval.lm_eval_adapter run ...)
"""

from __future__ import annotations


def main() -> None:
    from ..evaluation import lm_eval_model  # noqa: F401  (registers "quietstar"; says how to install lm-eval)
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
