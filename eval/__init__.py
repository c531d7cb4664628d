"""Evaluation commands run from a checkout: ``python eval/run.py`` (``quietstar-eval``) and ``python -m
eval.lm_eval_adapter`` (``quietstar-lm-eval``). The evaluation itself lives in ``quietstar/evaluation/``."""
