"""Export to the Hugging Face layout of the model's architecture: `deepseek_v3` (sigmoid routing: our models and
DeepSeek-V3-style ones) or `deepseek_v2` (softmax routing: what a model fine-tuned from DeepSeek-V2 stays). This
module writes; `gpt_moe.checkpoint.model_dir` and `gpt_moe.checkpoint.loading` read an export back.

    OUT_DIR/
        config.json                       transformers DeepseekV3Config (or DeepseekV2Config)
        model.safetensors                 (or model-0000i-of-0000n.safetensors + model.safetensors.index.json)
        mtp.safetensors                   the multi-token-prediction block (transformers has none; we read it back)
        gpt_moe.json                      our exact model config, tokenizer record and training facts
        tokenizer.tiktoken                the tiktoken BPE file (mergeable ranks)
        tokenizer.json                    the same tokenizer for transformers (+ tokenizer_config.json with the
                                          chat template), so AutoTokenizer.from_pretrained(OUT_DIR) works too
        README.md                         a model card with the training figures

A model fine-tuned from a published checkpoint keeps that model's own tokenizer files and chat template, copied
unchanged (tokenizer.json or tiktoken.model, tokenizer_config.json, ...) instead of the three tokenizer files above.

`transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR)` loads it with no missing or
unexpected keys, because the parameter names are already transformers'; `AutoTokenizer` loads the
tokenizer. The directory is built beside OUT_DIR and published whole (`gpt_moe.atomic.publish_dir`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gpt_moe.atomic import partial_dir, publish_dir, unwritable_reason
from gpt_moe.checkpoint.evaluation import figure_table
from gpt_moe.checkpoint.loading import LoadedModel
from gpt_moe.checkpoint.model_dir import EXPORT_RECORD_FILE, HF_CONFIG_FILE, MTP_FILE
from gpt_moe.checkpoint.records import TrainingFacts
from gpt_moe.data.chat_template import JINJA_TEMPLATE
from gpt_moe.data.tokenizer import TokenizerInfo, hf_tokenizer_config, hf_tokenizer_json
from gpt_moe.data.tokenizer_format import copy_tokenizer_files
from gpt_moe.errors import CheckpointError
from gpt_moe.model.config import ModelConfig, to_hf_config
from gpt_moe.model.model import mtp_prefix
from gpt_moe.model.params import account, human

SHARD_BYTES = 4 * 1024 ** 3
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "bfloat16": torch.bfloat16, "float32": torch.float32}


def export_dtype(name: str, training: TrainingFacts) -> tuple[torch.dtype, str]:
    """(dtype of the exported weights, why). name: "bf16", "fp32" (or "bfloat16", "float32"), or "auto": the
    precision the checkpoint was trained in (its record's bf16, kept in an export's training facts); fp32 when
    that is unknown, which loses nothing."""
    if name != "auto":
        return DTYPES[name], f"--dtype {name}"
    if training.bf16 is None:
        return torch.float32, "auto: training precision unknown, fp32 loses nothing"
    return (torch.bfloat16, "auto: trained in bf16") if training.bf16 else (torch.float32, "auto: trained in fp32")


def export(loaded: LoadedModel, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Writes the directory (built beside it, published when complete)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CheckpointError(f"{out_dir}: exists and is not empty; choose a new export directory")
    reason = unwritable_reason(out_dir.parent)
    if reason:
        raise CheckpointError(f"{out_dir}: cannot write the export there ({reason}); choose a writable directory")
    config, info = loaded.model.config, loaded.tokenizer_info
    hf = to_hf_config(config)  # refuses what transformers has no equivalent of, before anything is written
    _check_v2_biases(loaded.model)
    partial = partial_dir(out_dir)
    _write_weights(loaded.model, partial, dtype)
    hf.update({"torch_dtype": str(dtype).removeprefix("torch."), "eos_token_id": info.eot_id,
               "bos_token_id": info.document_prefix[0] if info.document_prefix else None, "pad_token_id": None})
    (partial / HF_CONFIG_FILE).write_text(json.dumps(hf, indent=1))
    ours = {"model_config": config.to_dict(), "tokenizer": info.to_dict(), "training": loaded.training.to_dict()}
    (partial / EXPORT_RECORD_FILE).write_text(json.dumps(ours, indent=1))
    _write_tokenizer(loaded, partial)
    (partial / "README.md").write_text(model_card(config, loaded.training, info, dtype))
    return publish_dir(partial, out_dir)


def _write_tokenizer(loaded: LoadedModel, directory: Path) -> None:
    """A published model's own tokenizer files, unchanged; ours as the tiktoken file plus its transformers form."""
    info = loaded.tokenizer_info
    copy_tokenizer_files(info, loaded.source, directory)
    if not info.published:
        (directory / "tokenizer.json").write_text(hf_tokenizer_json(loaded.tokenizer))
        (directory / "tokenizer_config.json").write_text(json.dumps(hf_tokenizer_config(JINJA_TEMPLATE), indent=1))


def _write_weights(model: torch.nn.Module, directory: Path, dtype: torch.dtype) -> None:
    """The main model's weights in `dtype` (the balancing biases stay fp32) as safetensors, sharded when large,
    and the MTP block in its own file."""
    from safetensors.torch import save_file

    config = model.config
    mtp = mtp_prefix(config)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight")
    if config.scoring_func == "softmax":  # deepseek_v2: no balancing bias (zero, `_check_v2_biases`)
        state = {k: v for k, v in state.items() if not k.endswith("e_score_correction_bias")}
    main = {k: (v if k.endswith("e_score_correction_bias") else v.to(dtype)) for k, v in state.items()
            if not k.startswith(mtp)}
    shards = _shard(main)
    if len(shards) == 1:
        save_file(shards[0], directory / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, directory / name, metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(v.numel() * v.element_size() for v in main.values())
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    block = {k: v.to(dtype) for k, v in state.items() if k.startswith(mtp)}
    if block:
        save_file(block, directory / MTP_FILE, metadata={"format": "pt"})


def _check_v2_biases(model: torch.nn.Module) -> None:
    """Softmax routing exports as deepseek_v2, whose router has no balancing bias: ours must still be zero."""
    if model.config.scoring_func != "softmax":
        return
    for layer, moe in model.moe_layers():
        if moe.gate.e_score_correction_bias.any():
            raise CheckpointError(f"the balancing bias of layer {layer} is not zero (trained with --bias-update-rate "
                                  "> 0), but softmax routing exports as transformers deepseek_v2, whose router has no "
                                  "bias; fine-tune with --bias-update-rate 0")


def _shard(state: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, value in state.items():
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += nbytes
    return shards


def model_card(config: ModelConfig, training: TrainingFacts, tokenizer: TokenizerInfo,
               dtype: torch.dtype = torch.bfloat16) -> str:
    a = account(config)
    trained = {True: "bf16", False: "fp32"}.get(training.bf16, "unknown")
    lines = [
        f"# {config.name} (gpt-moe)",
        "",
        "A DeepSeek-style language model (Multi-head Latent Attention, DeepSeekMoE with aux-loss-free balancing"
        f"{', multi-token prediction' if config.num_nextn_predict_layers else ''}) trained with gpt-moe.",
        "",
        "| | |",
        "| --- | --- |",
        f"| parameters | {human(a.total_params)} total, {human(a.active_params)} activated per token |",
        f"| layers / hidden / heads | {config.num_hidden_layers} / {config.hidden_size} / "
        f"{config.num_attention_heads} |",
        f"| experts | {config.n_routed_experts} routed (top-{config.num_experts_per_tok}), "
        f"{config.n_shared_experts} shared |",
        f"| weights | {str(dtype).removeprefix('torch.')} (trained in {trained}; the balancing biases fp32) |",
        f"| tokenizer | {tokenizer.describe()} |",
        f"| training step / tokens | {training.step if training.step is not None else '?'} / "
        f"{training.tokens_seen:,} |" if training.tokens_seen is not None else "| training | unknown |",
        f"| validation loss | {training.val_loss:.4f} nats/token{training.bpb_text} |" if training.has_val_loss
        else "| validation loss | - |",
        f"| KV cache per token (bf16) | {a.kv_cache_bytes_per_token:,} B |",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained('.')  # logits match gpt-moe's",
        "tokenizer = AutoTokenizer.from_pretrained('.')  # the ids gpt-moe trained on; chat template included",
        "```",
        "",
        "The MTP block is in `mtp.safetensors`; gpt-moe's `load_for_inference` reads everything back.",
        *evaluation_section(training),
    ]
    return "\n".join(lines) + "\n"


def evaluation_section(training: TrainingFacts) -> list[str]:
    """The model card's evaluation table: the run's last evaluation, beside its `--init-from` parent's figures on
    the same data where the run measured them (`gpt_moe.checkpoint.evaluation`); nothing when not evaluated."""
    evaluation = training.evaluation
    if evaluation is None:
        return []
    step = f" (step {evaluation.step})" if evaluation.step is not None else ""
    parent = evaluation.parent
    columns = [("before fine-tuning", parent), (f"after{step}", evaluation)] if parent else [(f"this model{step}",
                                                                                            evaluation)]
    return ["", "## Evaluation", "",
            "The training run's last evaluation (`python launch/eval.py CHECKPOINT` computes the same figures for any "
            "checkpoint). Validation figures are on the run's own validation split (for chat data its assistant "
            "tokens); HumanEval is OpenAI's, scored teacher-forced, never trained on."
            + (f" Before fine-tuning: the parent ({training.init_from or 'its --init-from weights'}) evaluated on the "
               "same data before the first step." if parent else "")
            + (" The routing drift compares the expert loads of this model and its parent on the same tokens."
               if evaluation.drift else ""),
            "", figure_table(columns, markdown=True)]
