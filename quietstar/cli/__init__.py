"""The commands of the package (console scripts installed by ``pip install quietstar``):

- ``quietstar-train`` (``train.py``): train a causal LM with Quiet-STaR from a YAML config and flags;
- ``quietstar-eval`` (``eval.py``): GSM8K / CommonsenseQA with the paper's protocols;
- ``quietstar-generate`` (``generate.py``): generate text, thinking before every token;
- ``quietstar-export`` (``export.py``, also ``export()`` and ``push_to_hub()`` for Python): a Hub-ready folder with
  a model card, optionally pushed;
- ``quietstar-report`` (``report.py``): evaluate a finished run before and after training, write its report;
- ``quietstar-lm-eval`` (``lmeval.py``): the ``lm_eval`` command with the ``quietstar`` model registered.

From a checkout, ``scripts/{train,generate,export,report}.py``, ``eval/run.py`` and ``python -m
eval.lm_eval_adapter`` run the same commands. Each module's ``main(argv=None)`` is its command (``eval`` and
``report`` return their results, so their console scripts call ``cli()``, which does not).
"""
