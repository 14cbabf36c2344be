"""Attention math for the slot cache: torch references (the specification, and the CPU path) and Triton
kernels for CUDA tensors, one module per kernel (decode_attention, chunk_attention, window_scores,
zsmerge_update); dispatch.py decides which runs (KVZOO_KERNELS=auto|torch|triton)."""
