"""Multi-head Latent Attention (MLA, DeepSeek-V2 sec. 2.1).

Queries go through an optional low-rank bottleneck (`q_a_proj` -> RMSNorm -> `q_b_proj`).
Keys and values share one down-projection `kv_a_proj_with_mqa` to a latent of
`kv_lora_rank` numbers plus one RoPE key of `qk_rope_head_dim` shared by all heads;
the latent is normalised (`kv_a_layernorm`) and expanded per head by `kv_b_proj`.

Two ways to compute the same attention:

* `forward` (training, prefill of a full sequence): expand the latent to per-head
  keys/values and call `scaled_dot_product_attention` (flash / memory-efficient kernels).
* `decode` (generation): the cache holds only the normalised latent and the rotated
  RoPE key per token, i.e. (kv_lora_rank + qk_rope_head_dim) numbers instead of
  heads * (qk_head_dim + v_head_dim). The key up-projection is absorbed into the query
  and the value up-projection into the output, so attention runs directly on the latent
  as a single-KV-head (MQA) attention of width kv_lora_rank + qk_rope_head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gpt_moe.model.config import ModelConfig
from gpt_moe.model.norm import RMSNorm
from gpt_moe.model.rope import apply_rope


@dataclass
class LatentCache:
    """One layer's decode cache: normalised KV latent and rotated RoPE key of every token, side by side.

    entries: [batch, capacity, kv_lora_rank + qk_rope_head_dim] (latent first); `length` positions are
    filled. One tensor, so the attention key is a view of it, not a per-step concatenation.
    """

    entries: torch.Tensor
    rank: int
    length: int = 0

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, capacity: int, device: torch.device | str,
              dtype: torch.dtype) -> "LatentCache":
        width = config.kv_lora_rank + config.qk_rope_head_dim
        return cls(torch.zeros(batch, capacity, width, device=device, dtype=dtype), config.kv_lora_rank)

    @property
    def latent(self) -> torch.Tensor:
        return self.entries[..., : self.rank]

    @property
    def rope_key(self) -> torch.Tensor:
        return self.entries[..., self.rank:]

    def append(self, latent: torch.Tensor, rope_key: torch.Tensor) -> torch.Tensor:
        """Stores [batch, new, *] entries; returns everything cached so far, [batch, total, rank + rope]."""
        end = self.length + latent.shape[1]
        if end > self.entries.shape[1]:
            raise ValueError(f"latent cache full: capacity {self.entries.shape[1]}, need {end}")
        self.entries[:, self.length:end, : self.rank] = latent
        self.entries[:, self.length:end, self.rank:] = rope_key
        self.length = end
        return self.entries[:, :end]

    def rewind(self, length: int) -> None:
        """Forgets every position from `length` on (a rejected speculative draft); they are overwritten next."""
        if not 0 <= length <= self.length:
            raise ValueError(f"latent cache rewind to {length}: expected 0 .. {self.length}")
        self.length = length


def decode_mask(past: int, new: int, key_mask: torch.Tensor | None, device) -> torch.Tensor | None:
    """Where `new` tokens after `past` cached ones may attend: [new, past + new] causal (or [b, 1, new, total]
    with key_mask [b, total], False for padded slots); None for one new token and no key_mask (it sees them all)."""
    if new == 1 and key_mask is None:
        return None
    total = past + new
    mask = torch.arange(total, device=device)[None, :] <= (past + torch.arange(new, device=device))[:, None]
    return mask if key_mask is None else mask[None, None] & key_mask[:, None, None, :]


@dataclass
class ExpandedCache:
    """Per-head keys and values, as a conventional multi-head attention would cache them (for comparison:
    heads * (qk_head_dim + v_head_dim) numbers per token instead of kv_lora_rank + qk_rope_head_dim).

    keys: [batch, heads, capacity, qk_head_dim]; values: [batch, heads, capacity, v_head_dim].
    """

    keys: torch.Tensor
    values: torch.Tensor
    length: int = 0

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, capacity: int, device: torch.device | str,
              dtype: torch.dtype) -> "ExpandedCache":
        nh = config.num_attention_heads
        return cls(torch.zeros(batch, nh, capacity, config.qk_head_dim, device=device, dtype=dtype),
                   torch.zeros(batch, nh, capacity, config.v_head_dim, device=device, dtype=dtype))

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + keys.shape[2]
        if end > self.keys.shape[2]:
            raise ValueError(f"expanded cache full: capacity {self.keys.shape[2]}, need {end}")
        self.keys[:, :, self.length:end] = keys
        self.values[:, :, self.length:end] = values
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class MultiHeadLatentAttention(nn.Module):
    """MLA with HF `deepseek_v3` parameter names. x: [batch, seq, hidden] -> [batch, seq, hidden]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        h, nh = config.hidden_size, config.num_attention_heads
        self.num_heads = nh
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim, self.kv_rank = config.v_head_dim, config.kv_lora_rank
        self.scale = config.softmax_scale
        if config.q_lora_rank:
            self.q_a_proj = nn.Linear(h, config.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = nn.Linear(config.q_lora_rank, nh * config.qk_head_dim, bias=False)
        else:
            self.q_proj = nn.Linear(h, nh * config.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, self.kv_rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_rank, nh * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(nh * self.v_dim, h, bias=False)

    def _queries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [b, s, hidden] -> (q_nope [b, heads, s, nope], rotated q_rope [b, heads, s, rope])."""
        b, s, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.config.q_lora_rank else self.q_proj(x)
        q = q.view(b, s, self.num_heads, -1).transpose(1, 2)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, apply_rope(q_rope, cos, sin, self.config.rope_interleave)

    def _latents(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [b, s, hidden] -> (normalised latent [b, s, kv_rank], rotated rope key [b, s, rope])."""
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope_dim], dim=-1)
        k_rope = apply_rope(k_rope.unsqueeze(1), cos, sin, self.config.rope_interleave).squeeze(1)
        return self.kv_a_layernorm(latent), k_rope

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Causal self-attention over the whole sequence. cos/sin: [seq, rope/2] or [b, 1, seq, rope/2];
        attn_mask: None (causal) or [b, 1, seq, seq] bool, True where a query may attend (packed rows)."""
        b, s, _ = x.shape
        q_nope, q_rope = self._queries(x, cos, sin)
        latent, k_rope = self._latents(x, cos, sin)
        kv = self.kv_b_proj(latent).view(b, s, self.num_heads, -1).transpose(1, 2)
        k_nope, value = kv.split([self.nope_dim, self.v_dim], dim=-1)
        query = torch.cat((q_nope, q_rope), dim=-1)
        key = torch.cat((k_nope, k_rope.unsqueeze(1).expand(-1, self.num_heads, -1, -1)), dim=-1)
        # flash kernels (CUDA and CPU) need one head size for q, k and v; MLA's values are narrower
        # (V3: 128 vs 192), so they are zero-padded and the padding sliced off the output
        pad = query.shape[-1] - self.v_dim
        out = F.scaled_dot_product_attention(query, key, F.pad(value, (0, pad)) if pad > 0 else value,
                                             attn_mask=attn_mask, is_causal=attn_mask is None,
                                             scale=self.scale)[..., : self.v_dim]
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))

    def decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LatentCache | ExpandedCache,
               attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of `x` ([b, new, hidden], positions cache.length ...) over the cache plus itself.

        attn_mask: `decode_mask` of this step (built once per step for every layer), or None: causal over the new
        tokens, no cache slot masked. cos/sin: [b, 1, new, rope/2] or [new, rope/2].
        """
        past, new = cache.length, x.shape[1]
        q_nope, q_rope = self._queries(x, cos, sin)
        latent_new, k_rope_new = self._latents(x, cos, sin)
        mask = attn_mask if attn_mask is not None else decode_mask(past, new, None, x.device)
        if isinstance(cache, ExpandedCache):
            return self._decode_expanded(q_nope, q_rope, latent_new, k_rope_new, cache, mask)
        return self._decode_absorbed(q_nope, q_rope, latent_new, k_rope_new, cache, mask)

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_UK [heads, nope, rank], W_UV^T [heads, rank, v]): kv_b_proj's up-projections as the absorbed decode
        multiplies by them, contiguous. They are slices of kv_b_proj.weight with a batch stride a batched matmul
        cannot take, so it would copy them every step; they are copied once per version of the weight instead
        (any in-place update or load bumps the version). Under autograd: computed fresh, no copy kept."""
        weight = self.kv_b_proj.weight
        w = weight.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_rank)
        w_uk, w_uv = w.split([self.nope_dim, self.v_dim], dim=1)  # [heads, nope, rank], [heads, v, rank]
        if torch.is_grad_enabled() and weight.requires_grad:
            return w_uk, w_uv.transpose(1, 2)
        version = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
        if getattr(self, "_absorbed_version", None) != version:
            self._absorbed = (w_uk.contiguous(), w_uv.transpose(1, 2).contiguous())
            self._absorbed_version = version
        return self._absorbed

    def _decode_absorbed(self, q_nope, q_rope, latent_new, k_rope_new, cache: LatentCache, mask) -> torch.Tensor:
        """score = (q_nope W_UK) . latent + q_rope . k_rope; out = (p . latent) W_UV."""
        b, _, new, _ = q_nope.shape
        cached = cache.append(latent_new, k_rope_new)  # [b, total, rank + rope]

        w_uk, w_uv_t = self.absorbed_weights()  # [heads, nope, rank], [heads, rank, v]
        q_latent = torch.matmul(q_nope, w_uk)  # [b, heads, new, rank] (matmul, not einsum: decode is overhead-bound)
        query = torch.cat((q_latent, q_rope), dim=-1)  # [b, heads, new, rank + rope]
        key = cached.unsqueeze(1)  # [b, 1, total, rank + rope]
        # the value is the latent, key[..., :rank]; passing the whole key gives q, k and v one head size
        # (what the flash kernels need) at no copy, and the extra rope columns of the output are dropped
        value = key
        # one shared key/value head: fold the query heads into the query length ([b, 1, heads*new, .])
        # so the kernel reads each cached latent once instead of once per head
        heads = self.num_heads
        if mask is not None:
            mask = mask.expand(b, 1, new, -1) if mask.dim() == 4 else mask
            mask = mask.unsqueeze(-3).expand(*mask.shape[:-2], heads, new, mask.shape[-1]).flatten(-3, -2)
        out_latent = F.scaled_dot_product_attention(query.reshape(b, 1, heads * new, -1), key, value,
                                                    attn_mask=mask, scale=self.scale)
        out_latent = out_latent.view(b, heads, new, -1)[..., : self.kv_rank]  # [b, heads, new, rank]
        out = torch.matmul(out_latent, w_uv_t)  # [b, heads, new, v]
        return self.o_proj(out.transpose(1, 2).reshape(b, new, -1))

    def _decode_expanded(self, q_nope, q_rope, latent_new, k_rope_new, cache: ExpandedCache, mask) -> torch.Tensor:
        """Expand the new tokens' latents to per-head keys/values, cache those, attend as usual."""
        b, _, new, _ = q_nope.shape
        kv = self.kv_b_proj(latent_new).view(b, new, self.num_heads, -1).transpose(1, 2)
        k_nope, value_new = kv.split([self.nope_dim, self.v_dim], dim=-1)
        key_new = torch.cat((k_nope, k_rope_new.unsqueeze(1).expand(-1, self.num_heads, -1, -1)), dim=-1)
        keys, values = cache.append(key_new, value_new)
        out = F.scaled_dot_product_attention(torch.cat((q_nope, q_rope), dim=-1), keys, values, attn_mask=mask,
                                             scale=self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(b, new, -1))
