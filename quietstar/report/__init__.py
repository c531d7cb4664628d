"""The run report of ``quietstar-report`` (``scripts/report.py``): the before/after evaluations, held-out NLL by token,
plots of training and of the NLL change by token difficulty, and ``report.md``; and ``model_card.py``, the model card
of an export (``quietstar-export``)."""
