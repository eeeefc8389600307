"""Compute kernels of r1serve: the paged-attention backends (`attention`) and the plain-PyTorch reference of
the model's element-wise ops (`reference`). Triton versions live beside them and are checked against them.
"""
