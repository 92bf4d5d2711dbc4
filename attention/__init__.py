"""Local attention with LSE, the LSE merge, and Ulysses / ring / USP sequence-parallel attention."""

from attention.backends import BACKEND_NAMES, AttentionCall, available_backends, select_backend
from attention.local import attention_with_lse
from attention.merge import merge_attention
from attention.ring import ring_attention
from attention.ulysses import ulysses_attention
from attention.usp import usp_attention

__all__ = [
    "BACKEND_NAMES",
    "AttentionCall",
    "attention_with_lse",
    "available_backends",
    "merge_attention",
    "ring_attention",
    "select_backend",
    "ulysses_attention",
    "usp_attention",
]
