"""Next-image-token cross-entropy without materialising B x T x codebook-size logits.

Only positions whose label is an image code take part. They are cut into chunks of ``chunk_size``; for
each chunk the forward pass computes the logits, the loss and, right away, the chunk's gradients with
respect to the hidden states, the head weight and the bias (accumulated in place), then drops the
logits. Backward only scales the stored gradients. At any time one chunk of logits exists, no logits are
recomputed, and the head's weight gradient is a single buffer the size of the weight (autograd would
otherwise hold one per chunk while summing them).

:class:`PixelHead` is the ``hidden -> codebook`` Linear with this loss as a second mode of its
``forward``, so wrappers that act on module calls (FSDP2 unsharding the head's parameters) see it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lit_star.models.sequence_layout import IGNORE_INDEX

DEFAULT_CHUNK_SIZE = 512


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``states @ weight.T + bias`` against ``targets`` (N rows), chunk by chunk."""

    @staticmethod
    def forward(ctx, states, weight, bias, targets, chunk_size, needs_grad):
        count = states.shape[0]
        want_states, want_weight, want_bias = needs_grad
        grad_states = torch.empty_like(states) if want_states else None
        # fp32 accumulation whatever the parameter dtype; cast back once in backward.
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_bias else None
        total = torch.zeros((), dtype=torch.float32, device=states.device)
        for start in range(0, count, chunk_size):
            chunk_states = states[start : start + chunk_size]
            chunk_targets = targets[start : start + chunk_size]
            logits = F.linear(chunk_states, weight, bias).float()
            log_normaliser = torch.logsumexp(logits, dim=-1, keepdim=True)
            total += (log_normaliser.squeeze(-1) - logits.gather(1, chunk_targets[:, None]).squeeze(-1)).sum()
            if not any(needs_grad):
                continue
            # d(mean CE)/d logits = (softmax - onehot) / N, built in the logits buffer.
            grad_logits = logits.sub_(log_normaliser).exp_()
            grad_logits[torch.arange(len(chunk_targets), device=logits.device), chunk_targets] -= 1.0
            grad_logits.div_(count)
            if want_states:
                grad_states[start : start + chunk_size] = grad_logits.to(weight.dtype) @ weight
            if want_weight:
                grad_weight.addmm_(grad_logits.t(), chunk_states.float())
            if want_bias:
                grad_bias += grad_logits.sum(dim=0)
        ctx.param_dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.save_for_backward(grad_states, grad_weight, grad_bias)
        return total / count

    @staticmethod
    def backward(ctx, grad_output):
        grad_states, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.param_dtypes
        # In place: these buffers are this graph's only use of them (backward runs once per forward).
        if grad_states is not None:
            grad_states = grad_states.mul_(grad_output.to(grad_states.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_output).to(weight_dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.mul_(grad_output).to(bias_dtype)
        return grad_states, grad_weight, grad_bias, None, None, None


def _select_labelled(
    hidden: torch.Tensor, labels: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} do not match")
    selected = labels != ignore_index
    if not bool(selected.any()):
        raise ValueError("no position has an image-token label; the batch has nothing to learn")
    return hidden[selected], labels[selected]


def chunked_cross_entropy(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T + bias`` over positions whose label is not ``ignore_index``.

    Args:
        hidden: ... x d (e.g. the stack output, B x T x d).
        labels: long tensor of ``hidden``'s leading shape.
        weight, bias: the head (codebook size x d, codebook size).
        chunk_size: number of positions whose logits exist at once.
    """
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise TypeError(
            f"weight must be the head's 2-D weight tensor, got {type(weight).__name__}; to use a head module call "
            "PixelHead(hidden, labels) (StackedAR.image_token_loss), which also lets FSDP unshard it"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    states, targets = _select_labelled(hidden, labels, ignore_index)
    states = states.to(weight.dtype)
    grad_on = torch.is_grad_enabled()
    needs_grad = (
        grad_on and states.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    return _ChunkedLinearCrossEntropy.apply(states, weight, bias, targets, chunk_size, needs_grad)


def one_shot_cross_entropy(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """The naive loss: logits for every position at once (the baseline of ``bench ar-loss``)."""
    logits = F.linear(hidden.to(weight.dtype), weight, bias).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index)


class PixelHead(nn.Linear):
    """``hidden -> codebook`` logits; with ``labels`` it returns the chunked image-token loss instead."""

    def __init__(self, hidden_size: int, codebook_size: int, chunk_size: int = DEFAULT_CHUNK_SIZE, **kwargs) -> None:
        super().__init__(hidden_size, codebook_size, **kwargs)
        self.chunk_size = chunk_size

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            return super().forward(hidden.to(self.weight.dtype))
        return chunked_cross_entropy(hidden, labels, self.weight, self.bias, self.chunk_size)
