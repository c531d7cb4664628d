"""Evaluate a Quiet-STaR model on GSM8K or CommonsenseQA: ``quietstar-eval`` (quietstar/cli/eval.py), run from a
checkout.

    python eval/run.py --model runs/ckpt --task gsm8k --protocol paper --limit 200 --output results.json
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's quietstar

from quietstar.cli.eval import main  # noqa: E402

if __name__ == "__main__":
    main()
