"""Generate text with a Quiet-STaR model, thinking before every token: ``quietstar-generate`` (quietstar/cli/generate.py), run from a checkout.

    python scripts/generate.py --model runs/tiny-cpu --prompt "12 + 7 =" --max-new-tokens 32 --show-thoughts
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's quietstar

from quietstar.cli.generate import main  # noqa: E402

if __name__ == "__main__":
    main()
