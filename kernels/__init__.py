"""orthrus_kernels: Triton kernels for orthrus-train, each with a torch fallback.

Front doors pick the backend (``backend="auto"|"triton"|"torch"``): Triton on CUDA tensors or
under ``TRITON_INTERPRET=1``, torch otherwise. The speculative-verification front door lives in
``orthrus_train.decode.verify`` (the one home of the acceptance rule); this package only holds
its Triton implementation.
"""

# This folder is installed as the package `orthrus_kernels`. Run from the repository root, the folder is
# also importable as `kernels`, the name of Hugging Face's kernel-hub package, which transformers
# probes for. Imported under that name it defines nothing but a version transformers rejects
# (tests/kernels/test_import_name.py), so transformers' model code keeps working.
__version__ = "0.0.0"

if __name__ == "orthrus_kernels":
    from orthrus_kernels._backend import HAS_TRITON, interpreting, resolve_backend, triton_usable
    from orthrus_kernels import verify  # noqa: F401  (decorate every kernel under one interpreter mode)
    from orthrus_kernels import decode_attn  # noqa: F401  (the same: layers' "live" decode attention)
    from orthrus_kernels import rmsnorm  # noqa: F401  (the same: layers' "triton" decode RMSNorm)
    from orthrus_kernels import rope  # noqa: F401  (the same: layers' "triton" decode RoPE and K/V write)
    from orthrus_kernels import swiglu  # noqa: F401  (the same: layers' "triton" decode MLP product)
    from orthrus_kernels import lm_head_argmax  # noqa: F401  (the same: the engines' fused greedy LM head)
    from orthrus_kernels import ops  # noqa: F401  (torch.ops.orthrus.*: the decode kernels in compiled steps)
    from orthrus_kernels.fused_kl import (
        chunked_linear_ce_reference,
        chunked_linear_kl_reference,
        fused_linear_ce,
        fused_linear_kl,
    )

__all__ = [
    "HAS_TRITON",
    "interpreting",
    "resolve_backend",
    "triton_usable",
    "verify",
    "decode_attn",
    "rmsnorm",
    "rope",
    "swiglu",
    "lm_head_argmax",
    "ops",
    "fused_linear_kl",
    "fused_linear_ce",
    "chunked_linear_kl_reference",
    "chunked_linear_ce_reference",
]
