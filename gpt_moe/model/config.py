"""Model configuration: one dataclass, loaded from JSON or a preset name, validated field by field.

Field names follow Hugging Face's `deepseek_v3` config so that a config exports to
`config.json` one to one. The fields after `rope_interleave` are ours: routing
score function, the auxiliary-loss-free bias update rate, the sequence-wise
balance loss coefficient and multi-token prediction.

Every impossible value raises `ConfigError` with one line that names the key,
the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt_moe.config_file import read_json_object, reject_unknown_keys
from gpt_moe.errors import ConfigError
from gpt_moe.model import hf_config

PRESET_DIR = Path(__file__).parent / "presets"
YARN_KEYS = {
    "type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
}


@dataclass
class ModelConfig:
    """Shape and routing of a DeepSeek-style model (MLA attention + DeepSeekMoE feed-forward)."""

    name: str = "custom"
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 768  # dense SwiGLU layers (the first `first_k_dense_replace`)
    moe_intermediate_size: int = 128  # each routed / shared expert
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    # MLA: queries through a rank-`q_lora_rank` bottleneck (0 = a full q_proj),
    # keys/values through one `kv_lora_rank` latent plus a shared RoPE key.
    q_lora_rank: int = 128
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    # DeepSeekMoE
    n_routed_experts: int = 16
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 1
    # positions and norms
    rope_theta: float = 10000.0
    # YaRN: {"type": "yarn", "factor", "original_max_position_embeddings", ...}
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    rope_interleave: bool = True  # RoPE pairs (x0,x1),(x2,x3),... as in the released DeepSeek weights
    # ours
    scoring_func: str = "sigmoid"  # "sigmoid" (V3) or "softmax" (V2)
    bias_update_rate: float = 1e-3  # aux-loss-free balancing step (V3 paper: gamma)
    seq_aux_loss_coef: float = 0.0  # sequence-wise balance loss weight (V3 paper: alpha, 1e-4)
    router_z_loss_coef: float = 0.0  # router z-loss weight (ST-MoE: 1e-3); 0 computes nothing
    num_nextn_predict_layers: int = 0  # multi-token prediction depth: 0 or 1
    mtp_loss_weight: float = 0.3
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # free-form notes, never read by the model

    # ------------------------------------------------------------------ derived sizes
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def experts_per_group(self) -> int:
        return self.n_routed_experts // self.n_group

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Layers at index >= first_k_dense_replace use DeepSeekMoE (the MTP block included)."""
        return self.n_routed_experts > 0 and layer_idx >= self.first_k_dense_replace

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_qk), times YaRN's mscale^2 when the context is extended (DeepSeek-V2 sec. 2.1.3)."""
        scale = self.qk_head_dim ** -0.5
        if self.rope_scaling:
            m = yarn_mscale(self.rope_scaling["factor"], self.rope_scaling.get("mscale_all_dim", 0.0))
            scale *= m * m
        return scale

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "ModelConfig":
        reject_unknown_keys(data, (f.name for f in dataclasses.fields(cls)), source)
        values = dict(data)
        if values.get("q_lora_rank") is None and "q_lora_rank" in values:
            values["q_lora_rank"] = 0  # HF writes null for "no query compression"
        config = cls(**values)
        config.validate(source)
        return config

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(read_json_object(path, "model config"), source=str(path))

    @classmethod
    def from_preset(cls, name: str) -> "ModelConfig":
        path = PRESET_DIR / f"{name}.json"
        if not path.is_file():
            raise ConfigError(f"unknown model preset {name!r}; available presets: {', '.join(list_presets())}")
        return cls.from_json(path)

    @classmethod
    def load(cls, name_or_path: str | Path) -> "ModelConfig":
        """A preset name (`tiny`, `deepseek-v3`, ...) or a path to a JSON file."""
        text = str(name_or_path)
        if text.endswith(".json") or Path(text).is_file():
            return cls.from_json(text)
        return cls.from_preset(text)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "ModelConfig":
        """A validated copy with some fields changed (used for command-line overrides)."""
        data = self.to_dict()
        data.update(changes)
        return ModelConfig.from_dict(data, source="overrides")

    # ------------------------------------------------------------------ validation
    def validate(self, source: str = "config") -> None:
        """Raise ConfigError on the first impossible value, naming key, value and what is allowed."""

        def fail(key: str, expected: str) -> None:
            raise ConfigError(f"{source}: {key}={getattr(self, key)!r} is invalid; expected {expected}")

        type_of = {f.name: f.type for f in dataclasses.fields(self)}
        for key, annotation in type_of.items():
            value = getattr(self, key)
            if annotation == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                fail(key, "an integer")
            if annotation == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))):
                fail(key, "a number")
            if annotation == "bool" and not isinstance(value, bool):
                fail(key, "true or false")

        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim",
                    "max_position_embeddings", "n_group", "topk_group"):
            if getattr(self, key) <= 0:
                fail(key, "a positive integer")
        for key in ("q_lora_rank", "n_routed_experts", "n_shared_experts", "first_k_dense_replace",
                    "num_experts_per_tok", "moe_intermediate_size"):
            if getattr(self, key) < 0:
                fail(key, "an integer >= 0")
        if self.qk_rope_head_dim <= 0 or self.qk_rope_head_dim % 2:
            fail("qk_rope_head_dim", "a positive even integer (RoPE rotates pairs)")
        for key in ("rope_theta", "rms_norm_eps", "initializer_range", "routed_scaling_factor"):
            if not getattr(self, key) > 0 or not math.isfinite(getattr(self, key)):
                fail(key, "a positive finite number")
        for key in ("bias_update_rate", "seq_aux_loss_coef", "router_z_loss_coef", "mtp_loss_weight"):
            if not getattr(self, key) >= 0:
                fail(key, "a number >= 0")
        if self.first_k_dense_replace > self.num_hidden_layers:
            fail("first_k_dense_replace", f"at most num_hidden_layers={self.num_hidden_layers}")
        if self.scoring_func not in ("sigmoid", "softmax"):
            fail("scoring_func", "'sigmoid' or 'softmax'")
        if self.num_nextn_predict_layers not in (0, 1):
            fail("num_nextn_predict_layers", "0 (off) or 1 (multi-token prediction depth 1)")

        if self.n_routed_experts > 0 and self.first_k_dense_replace < self.num_hidden_layers:
            if self.moe_intermediate_size <= 0:
                fail("moe_intermediate_size", "a positive integer when the model has MoE layers")
            if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
                fail("num_experts_per_tok", f"between 1 and n_routed_experts={self.n_routed_experts}")
            if self.n_routed_experts % self.n_group:
                fail("n_group", f"a divisor of n_routed_experts={self.n_routed_experts}")
            if self.topk_group > self.n_group:
                fail("topk_group", f"at most n_group={self.n_group}")
            if self.num_experts_per_tok > self.topk_group * self.experts_per_group:
                fail("num_experts_per_tok",
                     f"at most topk_group * experts per group = {self.topk_group * self.experts_per_group}")

        if self.rope_scaling is not None:
            self._validate_yarn(source)

    def _validate_yarn(self, source: str) -> None:
        scaling = self.rope_scaling
        if not isinstance(scaling, dict):
            raise ConfigError(f"{source}: rope_scaling={scaling!r} is invalid; expected null or a YaRN object")
        unknown = sorted(set(scaling) - YARN_KEYS)
        if unknown:
            raise ConfigError(f"{source}: rope_scaling has unknown key {unknown[0]!r}; "
                              f"allowed keys: {', '.join(sorted(YARN_KEYS))}")
        if scaling.get("type", "yarn") != "yarn":
            raise ConfigError(f"{source}: rope_scaling.type={scaling.get('type')!r} is invalid; expected 'yarn'")
        for key in ("factor", "original_max_position_embeddings"):
            if key not in scaling:
                raise ConfigError(f"{source}: rope_scaling.{key} is missing; YaRN needs factor and "
                                  "original_max_position_embeddings")
        if not (isinstance(scaling["factor"], (int, float)) and scaling["factor"] >= 1):
            raise ConfigError(f"{source}: rope_scaling.factor={scaling['factor']!r} is invalid; expected a number >= 1")
        original = scaling["original_max_position_embeddings"]
        if not (isinstance(original, int) and 0 < original <= self.max_position_embeddings):
            raise ConfigError(f"{source}: rope_scaling.original_max_position_embeddings={original!r} is invalid; "
                              f"expected an integer in 1..max_position_embeddings={self.max_position_embeddings}")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature factor 0.1*mscale*ln(scale)+1 (1 when not extending)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


# ---------------------------------------------------------------------- transformers interop
def to_hf_config(config: ModelConfig) -> dict[str, Any]:
    """The `config.json` transformers loads for this model: `deepseek_v3` (DeepseekV3ForCausalLM) for sigmoid
    routing, `deepseek_v2` for softmax routing (`gpt_moe.model.hf_config`)."""
    return hf_config.to_hf(config.to_dict())


def from_hf_config(hf: dict[str, Any], name: str = "from-hf", source: str = "HF config") -> ModelConfig:
    """Our config for a transformers `deepseek_v3` / `deepseek_v2` config.json; a field we do not model or a value we
    do not implement is refused in one line (`gpt_moe.model.hf_config`)."""
    return ModelConfig.from_dict({**hf_config.from_hf(hf, source), "name": name}, source=source)
