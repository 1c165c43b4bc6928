"""DeepSeek-V3's FP8 release format: e4m3 weights with one float32 scale per block (`{name}_scale_inv`,
quantization_config fp8 / weight_block_size). A tiny model quantised by the test loads to within e4m3's rounding
bound of its unquantised weights, equals the naive dequantisation exactly, and the dequantisation holds at most one
block row in fp32 beyond its output (measured with torch.profiler's allocation events)."""

from __future__ import annotations

import shutil

import pytest
import torch
from hf_dirs import V3_LIKE, edit_config, mtp_tensors, save_directory, transformers_model

from gpt_moe.checkpoint import fp8
from gpt_moe.checkpoint.loading import load_model, open_weights
from gpt_moe.checkpoint.model_dir import ModelDirectory
from gpt_moe.errors import CheckpointError

E4M3_HALF_ULP = 2.0 ** -4  # 3 mantissa bits: half the spacing of normal numbers, relative to the value
E4M3_SUBNORMAL_HALF_ULP = 2.0 ** -10  # below 2^-6 the spacing is 2^-9, absolute


def rounding_bound(weight: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """|dequantised - weight| may reach, elementwise, for a [rows, cols] weight quantised as the release is:
    x = w / s with s = max|w| of the block / 448 is rounded to e4m3, so |q - x| <= max(|x| 2^-4, 2^-10), and
    q * s is computed in fp32 (relative 2^-24): the bound is s * max(|x| 2^-4, 2^-10) + |w| 2^-23."""
    rows, cols = weight.shape
    scale = torch.empty_like(weight)
    for r in range(0, rows, block[0]):
        for c in range(0, cols, block[1]):
            tile = weight[r:r + block[0], c:c + block[1]]
            scale[r:r + block[0], c:c + block[1]] = tile.abs().max() / torch.finfo(fp8.FP8).max
    return scale * torch.maximum(weight.abs() / scale * E4M3_HALF_ULP,
                                 torch.full_like(weight, E4M3_SUBNORMAL_HALF_ULP)) + weight.abs() * 2.0 ** -23


def matrices(name: str, tensor: torch.Tensor, inter: int) -> list[tuple[str, torch.Tensor]]:
    """The 2-D weights the release quantises one by one: a stacked expert weight is one matrix per expert (and
    gate_up_proj two: gate rows, then up rows)."""
    if name.endswith("experts.gate_up_proj"):
        return [(f"{name}[{e}].{half}", tensor[e, i * inter:(i + 1) * inter])
                for e in range(tensor.shape[0]) for i, half in enumerate(("gate", "up"))]
    if name.endswith("experts.down_proj"):
        return [(f"{name}[{e}]", tensor[e]) for e in range(tensor.shape[0])]
    return [(name, tensor)]


@pytest.mark.parametrize("block", [(128, 128), (16, 24)])
def test_fp8_weights_load_within_the_e4m3_rounding_bound(tmp_path, block):
    """(128, 128): the release's blocks, larger than these matrices (one ragged block each); (16, 24): many
    blocks, ragged at both edges (64 = 2 x 24 + 16 columns)."""
    model = transformers_model("deepseek_v3", **V3_LIKE)
    directory = save_directory(model, tmp_path / "fp8", extra=mtp_tensors(model), fp8_block=block)
    ours = load_model(ModelDirectory.open(directory)).state_dict()
    original = model.state_dict()
    inter, worst, checked = V3_LIKE["moe_intermediate_size"], 0.0, 0
    for name, weight in original.items():
        if weight.dim() < 2 or name.endswith(("embed_tokens.weight", "lm_head.weight", "gate.weight")):
            assert torch.equal(ours[name], weight), name  # not quantised: read as stored
            continue
        for (label, w), (_, loaded) in zip(matrices(name, weight, inter), matrices(name, ours[name], inter)):
            error, bound = (loaded - w).abs(), rounding_bound(w, block)
            assert (error <= bound).all(), (label, (error / bound).max().item())
            worst, checked = max(worst, (error / bound).max().item()), checked + 1
    assert checked > 50 and worst > 0.5  # every quantised matrix checked; the bound is nearly reached: not vacuous


def test_fp8_dequantisation_equals_the_naive_product_in_every_output_dtype():
    weight = torch.randn(300, 200) * 3
    block = (128, 64)
    q, scale_inv = fp8.quantize(weight, block)
    naive = q.float() * scale_inv.repeat_interleave(block[0], 0)[:300].repeat_interleave(block[1], 1)[:, :200]
    for dtype in fp8.OUTPUT_DTYPES:
        out = torch.empty(300, 200, dtype=dtype)
        fp8.dequantize(lambda start, end: q[start:end], scale_inv, out, block)
        assert torch.equal(out, naive.to(dtype)), dtype  # one rounding, from the fp32 product


def peak_allocated(run) -> tuple[int, int]:
    """(peak bytes allocated and not yet freed while `run()` runs, bytes still allocated at its end), from
    torch.profiler's allocation and free events (self memory of each op, in time order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    live = peak = 0
    for _, change in events:
        live += change
        peak = max(peak, live)
    return peak, live


@pytest.mark.parametrize("dtype", fp8.OUTPUT_DTYPES)
def test_dequantisation_holds_at_most_one_block_row_in_fp32_beyond_its_output(dtype):
    """A 1024 x 4096 weight (16 MiB in fp32) in 128 x 128 blocks: beyond the output, the dequantisation's
    allocations peak at one block row's fp8 bytes (512 KiB, read from the file) for an fp32 output, and at one
    block row in fp32 (2 MiB) for a 16-bit one; nothing stays allocated."""
    rows, cols, block = 1024, 4096, (128, 128)
    q, scale_inv = fp8.quantize(torch.randn(rows, cols), block)
    out = torch.empty(rows, cols, dtype=dtype)
    block_row_fp32 = block[0] * cols * 4
    peak, left = peak_allocated(lambda: fp8.dequantize(lambda s, e: q[s:e].clone(), scale_inv, out, block))
    expected = block_row_fp32 // 4 if dtype == torch.float32 else block_row_fp32
    assert peak == expected <= block_row_fp32 and left == 0, (peak, expected, left)


def test_fp8_without_its_scales_or_quantization_config_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model = transformers_model("deepseek_v3", **{**V3_LIKE, "num_nextn_predict_layers": 0})
    directory = save_directory(model, tmp_path / "fp8", fp8_block=(16, 24))
    broken = tmp_path / "broken"
    for change, expected in [
        ("drop a scale", "o_proj.weight is torch.float8_e4m3fn without model.layers.1.self_attn.o_proj.weight_scale"),
        ("scale shape", "o_proj.weight_scale_inv is [1, 1]"),
        ("no quantization_config", "is FP8 but config.json has no quantization_config"),
    ]:
        shutil.rmtree(broken, ignore_errors=True)
        shutil.copytree(directory, broken)
        state = load_file(broken / "model.safetensors")
        key = "model.layers.1.self_attn.o_proj.weight_scale_inv"
        if change == "drop a scale":
            del state[key]
        elif change == "scale shape":
            state[key] = torch.ones(1, 1)
        else:
            edit_config(broken, quantization_config=None)
        save_file(state, broken / "model.safetensors")
        with pytest.raises(CheckpointError, match=expected.replace("[", r"\[").replace("]", r"\]")):
            open_weights(ModelDirectory.open(broken))
