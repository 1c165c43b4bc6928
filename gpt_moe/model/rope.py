"""Rotary position embedding with optional YaRN context extension.

DeepSeek applies RoPE only to a small decoupled part of each query/key head
(`qk_rope_head_dim`). YaRN (Peng et al., 2023) stretches the low frequencies by
`factor`, keeps the high ones, ramps between them, and rescales cos/sin by an
attention factor; DeepSeek additionally multiplies the softmax scale by
mscale(factor, mscale_all_dim)^2 (see `ModelConfig.softmax_scale`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gpt_moe.model.config import ModelConfig, yarn_mscale


def rope_inverse_frequencies(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Returns (inv_freq [rope_dim/2] fp32, attention_factor) for plain RoPE or YaRN."""
    dim, base = config.qk_rope_head_dim, config.rope_theta
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    scaling = config.rope_scaling
    if not scaling:
        return inv_freq, 1.0

    factor = float(scaling["factor"])
    original_context = scaling["original_max_position_embeddings"]
    beta_fast, beta_slow = scaling.get("beta_fast", 32), scaling.get("beta_slow", 1)
    mscale, mscale_all_dim = scaling.get("mscale", 1.0), scaling.get("mscale_all_dim", 0.0)

    def dim_of_rotations(rotations: float) -> float:
        # the dimension index whose wavelength completes `rotations` turns over the original context
        return dim * math.log(original_context / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(dim_of_rotations(beta_fast)), 0)
    high = min(math.ceil(dim_of_rotations(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep_original = 1 - ramp  # 1 for high frequencies (extrapolate), 0 for low ones (interpolate)
    inv_freq = inv_freq / factor * (1 - keep_original) + inv_freq * keep_original
    if mscale and mscale_all_dim:
        attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    else:
        attention_factor = yarn_mscale(factor)
    return inv_freq, attention_factor


class RotaryEmbedding(nn.Module):
    """Produces cos/sin tables for given positions."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        inv_freq, self.attention_factor = rope_inverse_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [seq] or [batch, seq] ints -> (cos, sin), each [..., seq, rope_dim/2] in `dtype`."""
        angles = positions.float()[..., None] * self.inv_freq.float()
        return (angles.cos() * self.attention_factor).to(dtype), (angles.sin() * self.attention_factor).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotates pairs of `x`: [batch, heads, seq, rope_dim] with cos/sin [seq, rope_dim/2] or
    [batch, 1, seq, rope_dim/2].

    `interleaved` pairs (x0,x1),(x2,x3),... (the released DeepSeek layout); otherwise the
    halves (x_i, x_{i+d/2}). Either way the output is laid out as [rotated firsts, rotated
    seconds]: queries and keys get the same permutation, so their dot products are unchanged.
    """
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
