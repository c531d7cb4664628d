"""SUS backprop: attention with an exact forward and a sparse, unbiased, stochastic backward (docs/design.md §3).

``sus_attention`` is the public entry point; ``attention`` also takes the thought layout, and
``resolve_backend`` says what backend="auto" picks (``function.py``). Each SUS design (``sus_design``) has a
PyTorch reference, Triton kernels and their launches: ``design_a_reference.py``, ``design_a_kernels.py``,
``design_a_launch.py`` ("a": each weight drawn on its own) and ``design_c_*.py`` ("c": per (row, key tile) first).
What both share: ``reference.py`` (the pattern, exact attention), ``common_kernels.py`` (Triton helpers),
``common_launch.py`` (tiles and launch arguments), ``rng.py`` (the random numbers), ``limits.py`` (what the
attention accepts). README.md holds the math, the cost model and the design choice.
"""

from .function import attention, resolve_backend, sus_attention

__all__ = ["attention", "resolve_backend", "sus_attention"]
