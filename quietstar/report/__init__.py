"""The run report of ``scripts/report.py``: held-out NLL by token, plots of training and of the NLL change by token
difficulty, and ``report.md``."""
