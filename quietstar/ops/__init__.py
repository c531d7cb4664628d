"""The kernel floor: pure tensor rules and the fast paths of attention, each tested against its PyTorch reference.

``visibility.py``: the thought layout's visibility rule and position ids, which every backend applies.
``precision.py``: the one "at least fp32" rule. ``sus/``: SUS attention (exact forward, sparse unbiased stochastic
backward), Triton kernels with their own reference. ``flash_cpu.py`` (PyTorch's CPU flash kernels) and ``flex.py``
(FlexAttention): the thought layout's exact attention, whose reference is :mod:`quietstar.attention.eager`.
:mod:`quietstar.attention.dispatch` picks among them. Nothing here imports from the rest of quietstar
(tests/test_imports.py).
"""
