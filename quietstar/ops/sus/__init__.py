"""SUS backprop: attention with an exact forward and a sparse, unbiased, stochastic backward (DESIGN §3).

``sus_attention`` is the public entry point; ``attention`` also takes the thought layout. The
PyTorch reference is in ``reference.py``, the Triton kernels in ``kernels.py``; README.md holds
the math, the cost model and the design choice.
"""

from .function import attention, sus_attention

__all__ = ["attention", "sus_attention"]
