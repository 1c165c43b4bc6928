"""The language-modelling loss: output head and cross-entropy fused, a chunk of tokens at a time.

Computing `logits = hidden @ W^T` for the whole batch and then the cross-entropy materialises
[tokens, vocab] fp32 logits, and autograd keeps them (or their log-softmax) for a backward pass
that writes a gradient of the same size. For DeepSeek-V3's 129k vocabulary that is 2 GB per
4k-token sequence, twice with multi-token prediction.

Here the head runs over chunks of tokens. For each chunk, the forward pass computes the logits,
their log-softmax and the loss, and - when gradients are wanted - straight away the logits'
gradient (softmax - one_hot) / n, its products with the weight (-> d hidden) and with the
hidden states (-> d W, accumulated in fp32), then drops the chunk. Backward only scales those by
the incoming gradient. Chunks hold about as many logits as the hidden states have numbers
(vocab / hidden chunks, the rule of Liger-Kernel's fused linear cross-entropy), but at least
MIN_CHUNK_TOKENS tokens. The time is that of the unfused head (its three matmuls dominate);
what it saves is memory.
"""

from __future__ import annotations

import math

import torch

IGNORE_INDEX = -100
# smaller chunks make the head's matmuls inefficient (measured on CPU: 256-token chunks 10% slower than
# unchunked for the tiny preset, 1024-token chunks as fast)
MIN_CHUNK_TOKENS = 1024


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of softmax(hidden @ weight^T) against labels, labels == -100 ignored.

    hidden: [..., hidden_size]; weight: [vocab, hidden_size]; labels: [...] int64 -> scalar fp32
    (NaN when every label is ignored, as F.cross_entropy)."""
    hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return LinearCrossEntropy.apply(hidden, weight, labels)
    return loss_and_gradients(hidden, weight, labels, want_grads=False)[0]


def chunk_tokens(tokens: int, vocab: int, hidden_size: int) -> int:
    """Tokens per chunk of the head: about as many logits as the hidden states have numbers, at least
    MIN_CHUNK_TOKENS."""
    return max(MIN_CHUNK_TOKENS, math.ceil(tokens / max(1, vocab // hidden_size)))


@torch.no_grad()
def token_nats(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each position, chunk by chunk, without gradients (bits per byte, per-item scores).

    hidden: [..., hidden_size]; weight: [vocab, hidden_size]; labels: [...] int64 -> [...] fp32
    -log softmax(hidden @ weight^T)[label] in nats, 0 where labels == -100."""
    shape, hidden, labels = labels.shape, hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    valid = labels != IGNORE_INDEX
    targets = labels.masked_fill(~valid, 0)
    nats = torch.zeros(labels.shape, dtype=torch.float32, device=hidden.device)
    chunk = chunk_tokens(labels.numel(), weight.shape[0], hidden.shape[1])
    for start in range(0, labels.numel(), chunk):
        rows = slice(start, start + chunk)
        log_probs = torch.log_softmax((hidden[rows] @ weight.t()).float(), dim=-1)  # [chunk, vocab]
        nats[rows] = -log_probs.gather(1, targets[rows, None]).squeeze(1) * valid[rows]
    return nats.reshape(shape)


def loss_and_gradients(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, want_grads: bool,
                       ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """hidden: [tokens, hidden_size]; weight: [vocab, hidden_size]; labels: [tokens] -> (mean loss fp32,
    d loss / d hidden [tokens, hidden_size], d loss / d weight [vocab, hidden_size] fp32), no gradients
    unless `want_grads`."""
    tokens, vocab = hidden.shape[0], weight.shape[0]
    valid = labels != IGNORE_INDEX
    targets = labels.masked_fill(~valid, 0)
    count = valid.sum()
    grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if want_grads else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_grads else None
    loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
    chunk = chunk_tokens(tokens, vocab, hidden.shape[1])
    for start in range(0, tokens, chunk):
        rows = slice(start, min(start + chunk, tokens))
        log_probs = torch.log_softmax((hidden[rows] @ weight.t()).float(), dim=-1)  # [chunk, vocab]
        loss_sum -= (log_probs.gather(1, targets[rows, None]).squeeze(1) * valid[rows]).sum()
        if not want_grads:
            continue
        # d mean-loss / d logits = (softmax - one_hot) / count, zero on ignored rows; in place
        grad_logits = log_probs.exp_()
        grad_logits.scatter_add_(1, targets[rows, None], grad_logits.new_full((grad_logits.shape[0], 1), -1.0))
        grad_logits.mul_((valid[rows] / count.clamp(min=1))[:, None])
        grad_logits = grad_logits.to(weight.dtype)
        torch.mm(grad_logits, weight, out=grad_hidden[rows])
        if weight.dtype == torch.float32:
            grad_weight.addmm_(grad_logits.t(), hidden[rows])
        else:
            grad_weight += (grad_logits.t() @ hidden[rows]).float()
    return loss_sum / count, grad_hidden, grad_weight


class LinearCrossEntropy(torch.autograd.Function):
    """`loss_and_gradients` as an autograd function: the gradients are computed in forward, chunk by
    chunk, and backward scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss, grad_hidden, grad_weight = loss_and_gradients(hidden, weight, labels, want_grads=True)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss.to(grad_hidden.dtype), (grad_weight * grad_loss).to(ctx.weight_dtype), None
