"""Backends for the one fused op ``out = sum_j c_j * src_j (+ c_z * z)``."""
