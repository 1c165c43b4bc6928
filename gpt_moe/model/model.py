"""The DeepSeek-style decoder: embeddings, MLA + (dense | MoE) blocks, final norm, head, optional MTP.

Module and parameter names follow transformers' `DeepseekV3ForCausalLM`
(`model.embed_tokens`, `model.layers.{i}.self_attn...`, `model.layers.{i}.mlp...`,
`model.norm`, `lm_head`), so a state dict maps one to one. The multi-token prediction
block (V3 sec. 2.2) sits after the main layers at `model.layers.{num_hidden_layers}`
with the released names `enorm`, `hnorm`, `eh_proj`, `shared_head.norm`; it reuses the
model's embedding and output head.
"""

from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass

import torch
from torch import nn

from gpt_moe.model.attention import ExpandedCache, LatentCache, MultiHeadLatentAttention, decode_mask
from gpt_moe.model.config import ModelConfig
from gpt_moe.model.loss import IGNORE_INDEX, linear_cross_entropy, token_nats
from gpt_moe.model.moe import MLP, ExpertParallelism, Experts, MoE, TopkRouter
from gpt_moe.model.norm import RMSNorm
from gpt_moe.model.recompute import MODES, checkpointed
from gpt_moe.model.rope import RotaryEmbedding


def mtp_prefix(config: ModelConfig) -> str:
    """The state-dict key prefix of the MTP block: `model.layers.{num_hidden_layers}.`, as in DeepSeek-V3's release."""
    return f"model.layers.{config.num_hidden_layers}."


@dataclass
class ModelOutput:
    """logits: [batch, seq, vocab] (None when labels were given: the loss is computed without them).
    Losses are scalars (None when not computed)."""

    logits: torch.Tensor | None
    loss: torch.Tensor | None = None  # lm_loss + mtp_loss_weight * mtp_loss + aux_loss + z_loss
    lm_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None  # sequence-wise balance loss, weighted, summed over MoE layers
    z_loss: torch.Tensor | None = None  # router z-loss, weighted, summed over MoE layers
    token_nats: torch.Tensor | None = None  # [batch, seq] fp32 cross-entropy per position (0 where ignored)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + MLA(norm(x)), then x + FFN(norm(x)); FFN is dense or MoE by layer index."""

    def __init__(self, config: ModelConfig, layer_idx: int, expert_parallel: ExpertParallelism | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MultiHeadLatentAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.is_moe_layer(layer_idx):
            self.mlp = MoE(config, expert_parallel)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size)

    checkpoint_activations = False  # full checkpointing: keep the input, recompute the layer in backward
    compiled_forward = None  # `torch.compile(self.forward)`, set by `DeepSeekForCausalLM.compile_layers`

    def run(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            attn_mask: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The layer on whole sequences (training and evaluation; decoding calls it with a cache): compiled when
        `compile_layers` compiled it and the model is training, recomputed in the backward pass under full
        checkpointing (`gpt_moe.model.recompute`; the recomputation runs the same compiled graphs)."""
        fn = self.compiled_forward if self.compiled_forward is not None and self.training else self
        if self.checkpoint_activations and self.training:
            return checkpointed(self, fn, x, cos, sin, None, attn_mask)
        return fn(x, cos, sin, attn_mask=attn_mask)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LatentCache | None = None,
                attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x: [batch, seq, hidden] -> (same shape, this layer's router losses: see `MoE`). attn_mask: see
        `MultiHeadLatentAttention.forward`, or with `cache` (decoding) `MultiHeadLatentAttention.decode`."""
        h = self.input_layernorm(x)
        if cache is None:
            h = self.self_attn(h, cos, sin, attn_mask)
        else:
            h = self.self_attn.decode(h, cos, sin, cache, attn_mask)
        x = x + h
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            h, losses = self.mlp(h)
        else:
            h, losses = self.mlp(h), {}
        return x + h, losses


class LMHead(nn.Linear):
    """The output projection (`lm_head`). hidden: [..., hidden] -> logits [..., vocab]; with labels [...],
    the mean cross-entropy instead (per position [...] with `per_token`), computed chunk by chunk without
    materialising the logits (`gpt_moe.model.loss`). Being the module's forward, it runs inside DeepSpeed's ZeRO-3
    parameter hooks."""

    def __init__(self, hidden_size: int, vocab_size: int) -> None:
        super().__init__(hidden_size, vocab_size, bias=False)

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor | None = None,
                per_token: bool = False) -> torch.Tensor:
        if labels is None:
            return super().forward(hidden)
        if per_token:
            return token_nats(hidden, self.weight, labels)
        return linear_cross_entropy(hidden, self.weight, labels)


class SharedHead(nn.Module):
    """The MTP block's output norm; the projection itself is the model's `lm_head`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MultiTokenPredictionLayer(DecoderLayer):
    """MTP depth 1: from the main model's hidden state at t and the embedding of token t+1,
    predict token t+2. Input = eh_proj([enorm(embed(t+1)); hnorm(h_t)]) -- embedding first,
    the order in which the released weights are laid out."""

    def __init__(self, config: ModelConfig, layer_idx: int, expert_parallel: ExpertParallelism | None = None) -> None:
        super().__init__(config, layer_idx, expert_parallel)
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.shared_head = SharedHead(config)

    def predict(self, hidden: torch.Tensor, next_embeds: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | None = None, cache: LatentCache | None = None,
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """hidden, next_embeds: [batch, seq, hidden] -> (normalised output [batch, seq, hidden], router losses).
        With `cache` (the block's own latent cache, self-speculative decoding) the positions continue it."""
        if cache is not None:
            return self.shared_head.norm(self.decode(hidden, next_embeds, cos, sin, cache)), {}
        x = self.eh_proj(torch.cat((self.enorm(next_embeds), self.hnorm(hidden)), dim=-1))
        x, losses = self.run(x, cos, sin, attn_mask)
        return self.shared_head.norm(x), losses

    def decode(self, hidden: torch.Tensor, next_embeds: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               cache: LatentCache) -> torch.Tensor:
        """Decoding with the block's own latent cache (no gradients, nothing to recompute): hidden, next_embeds:
        [batch, new, hidden] at the positions after the cache's -> the block's output before the shared head's norm
        [batch, new, hidden]. That output plays the main model's hidden state when the block drafts again from
        its own draft (a chain of drafts: see `gpt_moe.serve.speculative`)."""
        x = self.eh_proj(torch.cat((self.enorm(next_embeds), self.hnorm(hidden)), dim=-1))
        return self.forward(x, cos, sin, cache=cache)[0]


class DeepSeekModel(nn.Module):
    """Embeddings, decoder layers (+ MTP layer), final norm. Prefix `model.` in the HF layout."""

    def __init__(self, config: ModelConfig, expert_parallel: ExpertParallelism | None = None) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        layers = [DecoderLayer(config, i, expert_parallel) for i in range(config.num_hidden_layers)]
        layers += [MultiTokenPredictionLayer(config, config.num_hidden_layers + i, expert_parallel)
                   for i in range(config.num_nextn_predict_layers)]
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    @property
    def main_layers(self) -> list[DecoderLayer]:
        return list(self.layers[: self.config.num_hidden_layers])

    @property
    def mtp_layer(self) -> MultiTokenPredictionLayer | None:
        return self.layers[-1] if self.config.num_nextn_predict_layers else None


class DeepSeekForCausalLM(nn.Module):
    """The language model. Call with input_ids [batch, seq] (and labels [batch, seq] for losses)."""

    def __init__(self, config: ModelConfig, expert_parallel: ExpertParallelism | None = None,
                 seed: int | None = 0) -> None:
        """seed=None skips initialisation (meta-device models for counting, weights loaded later)."""
        super().__init__()
        self.config = config
        self.model = DeepSeekModel(config, expert_parallel)
        self.lm_head = LMHead(config.hidden_size, config.vocab_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if seed is not None:
            self.init_weights(seed)

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def init_weights(self, seed: int, prefix: str = "") -> None:
        """Deterministic init from (seed, parameter name[, global expert id]); with `prefix`, only the modules
        whose names start with it (a block the `--init-from` weights lack), with the values a whole init gives.

        Seeding by name rather than by construction order makes the weights independent of
        the expert-parallel layout: expert e of layer l gets the same values on whichever rank
        holds it, and different experts never start identical."""
        std = self.config.initializer_range
        for module_name, module in self.named_modules():
            if not f"{module_name}.".startswith(prefix):
                continue
            with _gathered(list(module.parameters(recurse=False))):
                if isinstance(module, RMSNorm):
                    module.weight.fill_(1.0)
                elif isinstance(module, Experts):
                    first = module.first_expert
                    for pname, param in module.named_parameters(recurse=False):
                        for i, block in enumerate(param):
                            _seeded_normal_(block, std, seed, f"{module_name}.{pname}#{first + i}")
                elif isinstance(module, (nn.Linear, nn.Embedding, TopkRouter)):
                    _seeded_normal_(module.weight, std, seed, f"{module_name}.weight")
                    if isinstance(module, TopkRouter):
                        module.e_score_correction_bias.zero_()
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def set_activation_checkpointing(self, mode: str) -> None:
        """"none", "full" (every decoder layer recomputed, MoE routing replayed) or "selective" (the SwiGLU
        feed-forwards recomputed); see `gpt_moe.model.recompute`."""
        if mode not in MODES:
            raise ValueError(f"activation checkpointing {mode!r}: expected one of {', '.join(MODES)}")
        for layer in self.model.layers:
            layer.checkpoint_activations = mode == "full"
            if isinstance(layer.mlp, MoE):
                layer.mlp.save_routing = mode == "full"
        for module in self.modules():
            if isinstance(module, (MLP, Experts)):
                module.checkpoint_activations = mode == "selective"

    def compile_layers(self) -> None:
        """Regional `torch.compile` (as torchtitan compiles each transformer block): every decoder layer and the MTP
        block compiled on its own, for training forwards and their backward. Layers of one kind share their graphs
        (parameters are graph inputs), so compiling costs one dense layer, one MoE layer and the MTP block rather
        than the whole depth; the rest of the model (embeddings, head and loss, decoding) stays eager. Under expert
        parallelism the exchange of rows between ranks runs eagerly between compiled parts."""
        for layer in self.model.layers:
            layer.compiled_forward = torch.compile(layer.forward, dynamic=False)

    # ------------------------------------------------------------------ forward
    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
              segment_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """What the decoder layers read (arguments as `forward`): (embeddings [batch, seq, hidden], RoPE cos and
        sin ([seq, rope/2], or [batch, 1, seq, rope/2] for per-row positions), attention mask or None (causal))."""
        x = self.model.embed_tokens(input_ids)
        positions = position_ids if position_ids is not None else torch.arange(input_ids.shape[1],
                                                                                device=input_ids.device)
        cos, sin = self.model.rotary_emb(positions, x.dtype)
        if cos.dim() == 3:  # per-row positions: broadcast over heads
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return x, cos, sin, packed_causal_mask(segment_ids) if segment_ids is not None else None

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
                per_token_nats: bool = False) -> ModelOutput:
        """input_ids, labels: [batch, seq] (labels[t] is the token after input_ids[t]; -100 ignored).
        `per_token_nats` (evaluation, no gradients): also each position's loss as `token_nats` [batch, seq].

        Packed rows (fine-tuning): position_ids [batch, seq] restart at 0 with each conversation and
        segment_ids [batch, seq] number the conversations of a row; attention never crosses from one
        segment into another (a block-diagonal causal mask)."""
        config = self.config
        seq = input_ids.shape[1]
        x, cos, sin, mask = self.embed(input_ids, position_ids, segment_ids)
        router_losses: list[dict[str, torch.Tensor]] = []
        for layer in self.model.main_layers:
            x, losses = layer.run(x, cos, sin, mask)
            router_losses.append(losses)
        hidden = self.model.norm(x)
        if labels is None:
            return ModelOutput(logits=self.lm_head(hidden))

        nats = None
        if per_token_nats:
            nats = self.lm_head(hidden, labels=labels, per_token=True)
            lm_loss = nats.sum() / (labels != IGNORE_INDEX).sum()  # NaN when every label is ignored
        else:
            lm_loss = self.lm_head(hidden, labels=labels)
        loss = lm_loss
        mtp_loss = None
        mtp = self.model.mtp_layer
        if mtp is not None and seq > 1:
            # position t sees h_t and the embedding of token t+1 (input_ids[t+1]) and predicts labels[t+1]
            next_embeds = self.model.embed_tokens(input_ids[:, 1:])
            mtp_mask = mask[..., :-1, :-1] if mask is not None else None
            mtp_hidden, losses = mtp.predict(x[:, :-1], next_embeds, cos[..., :-1, :], sin[..., :-1, :], mtp_mask)
            router_losses.append(losses)
            mtp_labels = labels[:, 1:]
            if segment_ids is not None:  # the token after next must belong to the same conversation
                mtp_labels = mtp_labels.masked_fill(segment_ids[:, 1:] != segment_ids[:, :-1], IGNORE_INDEX)
            mtp_loss = self.lm_head(mtp_hidden, labels=mtp_labels)
            loss = loss + config.mtp_loss_weight * mtp_loss
        aux_loss, z_loss = (_sum_over_layers(router_losses, name) for name in ("aux", "z"))
        for extra in (aux_loss, z_loss):
            if extra is not None:
                loss = loss + extra
        return ModelOutput(logits=None, loss=loss, lm_loss=lm_loss, mtp_loss=mtp_loss, aux_loss=aux_loss,
                           z_loss=z_loss, token_nats=nats)

    # ------------------------------------------------------------------ incremental decoding
    def new_cache(self, batch: int, capacity: int, kind: str = "latent") -> list[LatentCache | ExpandedCache]:
        """Empty decode caches for the main layers (capacity = prompt + new tokens). "latent" keeps only
        MLA's compressed latents (the default); "expanded" per-head keys/values, for comparison."""
        param = self.lm_head.weight
        cache_type = {"latent": LatentCache, "expanded": ExpandedCache}[kind]
        return [cache_type.empty(self.config, batch, capacity, param.device, param.dtype)
                for _ in range(self.config.num_hidden_layers)]

    def decode_step(self, input_ids: torch.Tensor, caches: list[LatentCache | ExpandedCache],
                    positions: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                    last_logits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs new tokens [batch, new] through the cached model (prefill when the cache is empty).

        positions: [batch, new] (default cache length + 0..new-1); key_mask: [batch, total] bool,
        False for cache slots to ignore (left padding); last_logits: compute the logits of the last this many
        positions only (a prefill needs one: the head over a long prompt costs more than the layers).
        Returns (logits [batch, new or last_logits, vocab], final hidden state before the norm [batch, new, hidden])."""
        past = caches[0].length
        x = self.model.embed_tokens(input_ids)
        if positions is None:
            positions = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)
        cos, sin = self.model.rotary_emb(positions, x.dtype)
        if cos.dim() == 3:  # per-row positions: broadcast over heads
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        mask = decode_mask(past, input_ids.shape[1], key_mask, input_ids.device)  # one for every layer
        for layer, cache in zip(self.model.main_layers, caches):
            x, _ = layer(x, cos, sin, cache=cache, attn_mask=mask)
        return self.lm_head(self.model.norm(x if last_logits is None else x[:, -last_logits:])), x

    def moe_layers(self, include_mtp: bool = True) -> list[tuple[int, MoE]]:
        """(layer index, MoE block) of every MoE layer in order; the MTP block's index is num_hidden_layers."""
        layers = self.model.layers if include_mtp else self.model.main_layers
        return [(layer.layer_idx, layer.mlp) for layer in layers if isinstance(layer.mlp, MoE)]


def _sum_over_layers(router_losses: list[dict[str, torch.Tensor]], name: str) -> torch.Tensor | None:
    """The sum of one router loss over the layers that computed it (None when none did)."""
    terms = [losses[name] for losses in router_losses if name in losses]
    return torch.stack(terms).sum() if terms else None


def packed_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """segment_ids: [batch, seq] -> [batch, 1, seq, seq] bool: position t may attend to s <= t of its own segment."""
    seq = segment_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=segment_ids.device).tril()
    return (causal & (segment_ids[:, :, None] == segment_ids[:, None, :]))[:, None]


def _gathered(params: list[nn.Parameter]):
    """A context in which ZeRO-3-partitioned `params` (built under `deepspeed.zero.Init`) are whole and writable;
    what is written there is kept (every rank writes the same seeded values). A no-op for ordinary parameters."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def _seeded_normal_(tensor: torch.Tensor, std: float, seed: int, key: str) -> None:
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{key}".encode()))
    values = torch.randn(tensor.shape, generator=generator, dtype=torch.float32) * std
    tensor.copy_(values.to(device=tensor.device, dtype=tensor.dtype))
