"""A clean-room PyTorch reference of the DUP pipeline (detection + LoRA unlearning).

It follows ``docs/dup-method.md`` §2, §3 and §9: Hugging Face ``transformers`` models in torch, hidden states moved to the
host per batch, a second forward pass for the Mahalanobis part, sklearn ``ShrunkCovariance`` + ``pinvh`` and the
Calinski–Harabasz score for every layer, a per-sample NumPy SVD loop for the spectral score, and PEFT LoRA
unlearning with AdamW and a linear schedule. It deliberately does not import ``jdup`` so that it stays an
independent reference for timing and parity checks.
"""

from benchmarks.torch_baseline.data import Row, read_dup_csv, split_dev

__all__ = ["Row", "read_dup_csv", "split_dev"]
