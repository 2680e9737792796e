"""Triton kernels of symmpo-fast: ``@triton.jit`` functions only, no autograd, no policy."""
