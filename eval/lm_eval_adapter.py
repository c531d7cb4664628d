"""The lm-evaluation-harness model ``quietstar`` (quietstar/evaluation/lm_eval_model.py), from a checkout.

    python -m eval.lm_eval_adapter run --model quietstar --model_args pretrained=runs/ckpt --tasks arc_easy

is ``quietstar-lm-eval run ...``; ``import eval.lm_eval_adapter`` registers the model, as
``import quietstar.evaluation.lm_eval_model`` does.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's quietstar

from quietstar.cli.lmeval import main  # noqa: E402
from quietstar.evaluation.lm_eval_model import QuietStarLM  # noqa: E402, F401  (registers "quietstar")

if __name__ == "__main__":
    main()
