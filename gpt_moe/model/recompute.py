"""Activation checkpointing: recompute activations in the backward pass instead of keeping them.

    model.set_activation_checkpointing("full")   # or "selective", "none" (the default)

Modes (`--activation-checkpointing`):

* `full`: each decoder layer (the MTP block's too) keeps only its input; its forward runs again in
  the backward pass. MoE layers save their routing (the chosen expert ids, [tokens, k] int64) in the
  first pass and reuse it on recompute, so the recomputed layer sends the same rows to the same experts:
  under expert parallelism its all-to-all repeats with the same split sizes. Recomputation never adds to
  the balancing counts (`MoE.load_since_update`) or the health counters.
* `selective`: only the SwiGLU feed-forwards recompute: the routed experts' grouped matmuls inside this
  rank's local expert computation (after the all-to-all: no communication is repeated), the shared
  experts and the dense MLP. Attention, norms, router and dispatch keep their activations. (The attention
  softmax is not stored: `scaled_dot_product_attention` keeps only its output and log-sum-exp.)

Built on `torch.utils.checkpoint` with `use_reentrant=False`: it works under DeepSpeed's ZeRO hooks
with inputs that do not require gradients, returns non-tensor outputs (the router-loss dict), and its
`context_fn` tells the recomputed modules that they are recomputing. DeepSpeed's own
`deepspeed.checkpointing` is the reentrant variant (autograd.Function based), which needs an input that
requires grad and cannot return the dict.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

MODES = ("none", "full", "selective")


class Recomputable:
    """A module with training side effects (counters) that must happen once per step: `recomputing` is True
    while `checkpointed` reruns its forward in the backward pass."""

    recomputing: bool = False


@contextlib.contextmanager
def _recomputing(modules: list[Recomputable]) -> Iterator[None]:
    for module in modules:
        module.recomputing = True
    try:
        yield
    finally:
        for module in modules:
            module.recomputing = False


def checkpointed(module: nn.Module, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) keeping only its inputs; recomputed in backward, with `recomputing` set on every
    `Recomputable` inside `module` meanwhile. Plain fn(*args) when gradients are off (evaluation)."""
    if not torch.is_grad_enabled():
        return fn(*args)
    if torch.compiler.is_compiling():
        # compiled (`--compile`): the region joins the graph, whose backward recomputes it without running this
        # Python again, so no module is told it is recomputing and no counter can count twice
        return checkpoint(fn, *args, use_reentrant=False)
    flagged = [m for m in module.modules() if isinstance(m, Recomputable)]
    return checkpoint(fn, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _recomputing(flagged)))
