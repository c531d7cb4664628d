"""SUS backprop: attention with an exact forward and a sparse, unbiased, stochastic backward (docs/design.md §3).

``sus_attention`` is the public entry point; ``attention`` also takes the thought layout, and
``resolve_backend`` says what backend="auto" picks. The PyTorch reference is in ``reference.py``,
the Triton kernels in ``kernels.py`` (launched from ``launch.py``); design C (``sus_design="c"``) in
``row_tiles.py``, ``row_tiles_kernels.py`` and ``row_tiles_launch.py``; README.md holds the math, the
cost model and the design choice.
"""

from .function import attention, resolve_backend, sus_attention

__all__ = ["attention", "resolve_backend", "sus_attention"]
