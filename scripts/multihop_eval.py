"""Score the multi-hop task's six views (quietstar/cli/multihop.py), run from a checkout.

    python scripts/multihop_eval.py --model runs/smollm2-135m-multihop --hops 1 2 3 --output multihop.json
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's quietstar

from quietstar.cli.multihop import main  # noqa: E402

if __name__ == "__main__":
    main()
