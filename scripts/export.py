"""Export a Quiet-STaR checkpoint as a Hub-ready folder with a model card: ``quietstar-export`` (quietstar/cli/export.py), run from a checkout.

    python scripts/export.py CHECKPOINT OUT [--merge-lora] [--push-to-hub REPO [--private]] [--overwrite]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's quietstar

from quietstar.cli.export import main  # noqa: E402

if __name__ == "__main__":
    main()
