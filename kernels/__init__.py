"""Attention with a fused Jacobian-vector product (see kernels/attention_jvp.py)."""
