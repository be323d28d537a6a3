"""Helpers only the tests use (kept out of common.py, which holds what the method files share)."""
import torch

from common import IGNORE


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(labels[t+1] | ≤t) for every position, computed in fp32; returns (logp [B, T-1], mask [B, T-1])."""
    target = labels[:, 1:]
    mask = target != IGNORE
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    logp = logp.gather(-1, target.clamp(min=0)[..., None])[..., 0]
    return logp * mask, mask
