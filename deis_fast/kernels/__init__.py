"""Backends for the one fused op ``out = sum_j c_j * src_j (+ c_z * z)``.

The kernel contract's constants, declared once on the Python side (the C++ side declares them once in
``csrc/combine.h``; ``deis_fast._C`` exports its values and the tests check that both agree)."""
import torch

MAX_SOURCES = 6  # sources of one combine (AB-4 and RK4 with noise fit)
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # = df::DType in csrc/combine.h
