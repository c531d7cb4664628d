"""Fast paths of attention, each tested against its PyTorch reference.

``sus/``: SUS attention (exact forward, sparse unbiased stochastic backward), Triton kernels with
their own reference. ``flash_cpu.py``: the thought layout from PyTorch's CPU flash kernels; its
reference is :mod:`quietstar.attention.eager`. :mod:`quietstar.attention.dispatch` picks among them.
"""
