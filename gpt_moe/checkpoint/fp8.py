"""DeepSeek-V3's FP8 weights read back to a training dtype, one block row at a time.

The release stores most matrices as float8 e4m3 (`{name}`, [out, in]) with one float32 scale per block of
`weight_block_size` = [128, 128] elements (`{name}_scale_inv`, [ceil(out/128), ceil(in/128)]); the weight is
`q * scale_inv` blockwise (`config.json` `quantization_config`: quant_method "fp8", fmt "e4m3"). `dequantize`
writes it into the output (the parameter itself when loading) block row by block row, reading each block row's
bytes from the memory-mapped file as it goes: beyond the output it holds one block row's fp8 bytes (1 byte an
element) and, for a 16-bit output, one block row in fp32 (never both at once), so never a whole matrix in fp32.

e4m3 holds every value exactly in bf16, fp16 and fp32 (3 mantissa bits, exponents 2^-9 .. 448): a block row is
first copied into the output exactly, then multiplied by its scales in fp32 and rounded once to the output dtype,
as DeepSeek's own `weight_dequant` kernel does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

FP8 = torch.float8_e4m3fn
OUTPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def scale_shape(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    """The [block rows, block columns] of the scales of a [rows, columns] weight."""
    return -(-shape[0] // block[0]), -(-shape[1] // block[1])


def dequantize(read_rows: Callable[[int, int], torch.Tensor], scale_inv: torch.Tensor, out: torch.Tensor,
               block: tuple[int, int]) -> None:
    """out[rows, cols] = the fp8 weight times its block scales. read_rows(start, end): the fp8 rows [start, end)
    [end - start, cols] (a copy from the file); scale_inv: [ceil(rows/block_rows), ceil(cols/block_cols)] fp32."""
    if out.dtype not in OUTPUT_DTYPES:
        raise ValueError(f"FP8 weights dequantise to {OUTPUT_DTYPES}, not {out.dtype}")
    rows = out.shape[0]
    for index, start in enumerate(range(0, rows, block[0])):
        end = min(start + block[0], rows)
        dequantize_block_row(read_rows(start, end), scale_inv[index].float(), out[start:end], block[1])


def dequantize_block_row(q: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, block_cols: int) -> None:
    """One block row: q [r, cols] fp8, scales [ceil(cols / block_cols)] fp32 -> out [r, cols] (any OUTPUT_DTYPES).
    The fp8 bytes are dropped before the fp32 copy a 16-bit output needs is made."""
    out.copy_(q)  # exact in every output dtype
    del q
    if out.dtype == torch.float32:
        _scale_columns(out, scales, block_cols)
        return
    wide = out.float()
    _scale_columns(wide, scales, block_cols)
    out.copy_(wide)


def _scale_columns(x: torch.Tensor, scales: torch.Tensor, block_cols: int) -> None:
    """x[:, j] *= scales[j // block_cols], in place (fp32 x and scales: no temporary)."""
    cols = x.shape[1]
    full = cols // block_cols
    if full:
        x[:, :full * block_cols].view(x.shape[0], full, block_cols).mul_(scales[:full].view(1, full, 1))
    if cols % block_cols:
        x[:, full * block_cols:].mul_(scales[full])


def quantize(weight: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """The release's format for a [rows, cols] weight: (q fp8 e4m3, scale_inv [block rows, block cols] fp32) with
    scale_inv = max |w| of the block / 448 (e4m3's largest value), so that each block uses the whole fp8 range.
    Used to write test checkpoints; DeepSeek's released weights come quantised."""
    rows, cols = weight.shape
    scales = torch.empty(scale_shape((rows, cols), block), dtype=torch.float32)
    q = torch.empty(rows, cols, dtype=FP8)
    for i, r in enumerate(range(0, rows, block[0])):
        for j, c in enumerate(range(0, cols, block[1])):
            tile = weight[r:r + block[0], c:c + block[1]].float()
            scale = tile.abs().max().clamp_min(torch.finfo(torch.float32).tiny) / torch.finfo(FP8).max
            scales[i, j] = scale
            q[r:r + block[0], c:c + block[1]] = (tile / scale).to(FP8)
    return q, scales
