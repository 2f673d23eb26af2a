"""Triton kernels and their launchers, one module per scan family.

Nothing here knows about autograd: each launcher takes tensors and returns
tensors, and ``linrec``'s ops wire them into ``torch.library``. Every module
lists the kernel specialisations its launchers use in ``AOT_SPECS`` so CI can
compile them ahead of time for real GPU targets (the CPU interpreter accepts
code that the GPU compiler rejects).
"""
