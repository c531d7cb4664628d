"""Evaluate a finished run before and after training and write its report: ``quietstar-report`` (quietstar/cli/report.py), run from a checkout.

    python scripts/report.py runs/smollm2-135m-cpu [--gsm8k-items 24] [--csqa-items 24] [--heldout-documents 24]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's quietstar

from quietstar.cli.report import main  # noqa: E402

if __name__ == "__main__":
    main()
