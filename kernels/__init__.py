"""Triton kernels of attattr-fast, installed as `attattr_fast.kernels` (never a top-level `kernels`).

Import a kernel module only after setting TRITON_INTERPRET=1 when running on the CPU.
"""
