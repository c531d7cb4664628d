"""Train a causal LM with Quiet-STaR: ``quietstar-train`` (quietstar/cli/train.py), run from a checkout.

    python scripts/train.py --config configs/tiny-cpu.yaml [--field value ...]
    accelerate launch scripts/train.py --config configs/mistral-7b-openwebmath.yaml
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's quietstar

from quietstar.cli.train import main  # noqa: E402

if __name__ == "__main__":
    main()
