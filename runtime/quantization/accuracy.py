"""How close a fast path's next-token distributions are to a reference's.

Used by the accuracy gate of the quantized CPU path (issue 17): teacher-forced over a
text, at every position, compare the fast path's next-token distribution ``q`` with the
reference's ``p`` (the same checkpoint dequantized, float32 dense):

- mean KL divergence ``KL(p || q) = sum_v p_v (log p_v - log q_v)`` in nats, averaged
  over positions (the measure llama.cpp's ``llama-perplexity --kl-divergence`` reports);
- top-1 agreement: the fraction of positions where both argmaxes are the same token.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Agreement:
    """``mean_kl`` (nats per token) and ``top1`` (fraction in [0, 1]) over ``positions``."""

    mean_kl: float
    top1: float
    positions: int


def distribution_agreement(reference_logits, logits) -> Agreement:
    """Compare two ``[positions, vocab]`` logit tensors (any float dtype; computed in
    float64).

    Raises:
        ValueError: shapes differ or are empty.
    """
    import torch

    if reference_logits.shape != logits.shape or reference_logits.numel() == 0:
        raise ValueError(f"logit shapes differ or are empty: {tuple(reference_logits.shape)} vs {tuple(logits.shape)}")
    lp = torch.log_softmax(reference_logits.double(), dim=-1)
    lq = torch.log_softmax(logits.double(), dim=-1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    top1 = (reference_logits.argmax(-1) == logits.argmax(-1)).double().mean()
    return Agreement(float(kl.mean()), float(top1), int(reference_logits.shape[0]))
