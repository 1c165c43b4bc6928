"""Pictures of a reply's expert routing, drawn with Pillow (no plotting library needed).

`routing_heatmap`: one column per generated token, one panel per MoE layer. Small models get a
row per routed expert (a filled cell: the router sent that token there; darker = the expert with
the highest selection score); models with many layers x experts get a row per choice (1st..k-th)
with the cell coloured by the chosen expert's id. Long replies wrap into bands of
`tokens_per_band` columns, each with the tokens' text written below it.

`load_chart`: how many of the reply's (token, slot) assignments each expert received, stacked by
layer, with the uniform share (what perfect balance would give) as a dashed line.
"""

from __future__ import annotations

from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

from gpt_moe.serve.chat import RoutingRecord

LAYER_COLORS = ("#4C78A8", "#F58518", "#54A24B", "#E45756", "#72B7B2", "#B279A2", "#EECA3B", "#9D755D",
                "#FF9DA6", "#79706E")
BACKGROUND, PANEL, GRID, TEXT, MUTED = "#FFFFFF", "#F3F4F6", "#E2E4E8", "#1F2933", "#6B7280"
MAX_HEIGHT = 6000  # pixels; taller pictures (many layers x many experts) are scaled down


@lru_cache(maxsize=8)
def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled scalable font (no system fonts needed)."""
    return ImageFont.load_default(size=size)


def layer_color(j: int) -> str:
    return LAYER_COLORS[j % len(LAYER_COLORS)]


def _lighter(color: str, amount: float) -> tuple[int, int, int]:
    rgb = Image.new("RGB", (1, 1), color).getpixel((0, 0))
    return tuple(round(c + (255 - c) * amount) for c in rgb)


def token_label(raw: bytes, limit: int = 9) -> str:
    """Visible form of one token's bytes: spaces as '·', newlines as '\\n', a piece of a multi-byte
    character as its hex bytes ('\\xe2'), cut to `limit` characters."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = "".join(f"\\x{b:02x}" for b in raw)
    shown = text.replace(" ", "·").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    return shown if len(shown) <= limit else shown[:limit - 1] + "…"


def _vertical_text(text: str, width: int, height: int, color: str) -> Image.Image:
    """`text` written top-to-bottom in a width x height transparent tile."""
    strip = Image.new("RGBA", (height, width), (0, 0, 0, 0))
    ImageDraw.Draw(strip).text((2, width // 2), text, fill=color, font=font(11), anchor="lm")
    return strip.rotate(270, expand=True)


def _fit(image: Image.Image) -> Image.Image:
    if image.height <= MAX_HEIGHT:
        return image
    scale = MAX_HEIGHT / image.height
    return image.resize((max(1, round(image.width * scale)), MAX_HEIGHT), Image.Resampling.LANCZOS)


def expert_color(expert: int, n_experts: int) -> tuple[int, int, int]:
    """Colour of an expert id in the compact view: hue runs from red (e0) round to violet (last)."""
    hue = round(230 * expert / max(1, n_experts - 1))
    return Image.new("HSV", (1, 1), (hue, 170, 215)).convert("RGB").getpixel((0, 0))


def _colour_legend(draw: ImageDraw.ImageDraw, x0: int, n_experts: int) -> None:
    """The compact view's expert-id colour scale, in the title line at x0."""
    for x in range(120):
        draw.line((x0 + 15 + x, 6, x0 + 15 + x, 14), fill=expert_color(round(x / 119 * (n_experts - 1)), n_experts))
    draw.text((x0 + 12, 10), "e0", fill=MUTED, font=font(9), anchor="rm")
    draw.text((x0 + 138, 10), f"e{n_experts - 1}", fill=MUTED, font=font(9), anchor="lm")


def routing_heatmap(record: RoutingRecord, labels: list[str], stopped: bool = False,
                    tokens_per_band: int = 64, cell: int = 14, max_band_height: int = 1000) -> Image.Image:
    """Experts chosen per generated token and MoE layer. `labels`: one text per token of `record`
    (shown below its column); `stopped`: the last token is the end marker (its label is muted).

    Detailed view (when every layer's expert rows fit `max_band_height`): per layer one row per
    expert, chosen cells filled. Compact view (many layers x many experts): per layer one row per
    choice (1st..k-th), each cell coloured by the chosen expert's id.
    """
    n, n_layers, n_experts, k = len(record), len(record.layers), record.n_experts, record.k
    row = max(1, min(8, 128 // max(1, n_experts)))
    detailed = n_layers * (n_experts * row + 8) <= max_band_height
    if not detailed:
        row = max(3, min(8, 48 // max(1, k)))
    panel_h, gap, gutter, label_h, title_h, margin = (n_experts if detailed else k) * row, 8, 74, 64, 30, 12
    band_h = n_layers * (panel_h + gap) + label_h
    bands = max(1, -(-n // tokens_per_band))
    width = max(gutter + max(1, min(n, tokens_per_band)) * cell + margin, 560)
    image = Image.new("RGB", (width, title_h + bands * (band_h + gap) + margin), BACKGROUND)
    draw = ImageDraw.Draw(image)
    how = "darker = first choice" if detailed else "rows: 1st..last choice, colour = expert id"
    draw.text((margin, 8), f"Experts per generated token: top-{k} of {n_experts} routed experts, "
              f"{n_layers} MoE layer{'s' * (n_layers != 1)} ({how})", fill=TEXT, font=font(13))
    if not detailed:
        _colour_legend(draw, width - margin - 150, n_experts)
    draw.text((gutter - 4, title_h + band_h - label_h // 2), "token", fill=MUTED, font=font(10), anchor="rm")
    if n == 0 or n_layers == 0:
        draw.text((margin, title_h + 10), "no tokens generated" if n == 0 else "this model has no MoE layers",
                  fill=MUTED, font=font(12))
        return image
    ids = record.as_tensor()  # [tokens, layers, k]
    for band in range(bands):
        first, last = band * tokens_per_band, min(n, (band + 1) * tokens_per_band)
        top = title_h + band * (band_h + gap)
        right = gutter + (last - first) * cell
        for j, layer in enumerate(record.layers):
            y0 = top + j * (panel_h + gap)
            draw.rectangle((gutter, y0, right - 1, y0 + panel_h - 1), fill=PANEL)
            draw.text((6, y0 + panel_h // 2), f"layer {layer}", fill=layer_color(j) if detailed else TEXT,
                      font=font(12 if panel_h >= 12 else 9), anchor="lm")
            if detailed:
                for e in range(0, n_experts, 4 if n_experts <= 64 else n_experts // 16):
                    draw.line((gutter, y0 + e * row, right - 1, y0 + e * row), fill=GRID)
                draw.text((gutter - 4, y0), "e0", fill=MUTED, font=font(9), anchor="ra")
                draw.text((gutter - 4, y0 + panel_h), f"e{n_experts - 1}", fill=MUTED, font=font(9), anchor="rd")
            shades = [_lighter(layer_color(j), 0.0)] + [_lighter(layer_color(j), 0.5)] * (k - 1)
            for t in range(first, last):
                x = gutter + (t - first) * cell
                for rank, expert in enumerate(ids[t, j].tolist()):
                    y = y0 + (expert if detailed else rank) * row
                    fill = shades[rank] if detailed else expert_color(expert, n_experts)
                    draw.rectangle((x + 1, y, x + cell - 2, y + max(1, row - 1) - 1), fill=fill)
        label_top = top + n_layers * (panel_h + gap)
        for t in range(first, last):
            color = MUTED if stopped and t == n - 1 else TEXT
            tile = _vertical_text(labels[t] if t < len(labels) else "", cell, label_h, color)
            image.paste(tile, (gutter + (t - first) * cell, label_top), tile)
    return _fit(image)


def load_chart(record: RoutingRecord, height: int = 230) -> Image.Image:
    """Bar per expert: assignments of the reply, stacked by MoE layer; dashed line: the uniform share."""
    loads = record.load_by_layer()  # [layers, n_experts]
    n_experts = record.n_experts
    bar = max(3, min(36, 720 // max(1, n_experts)))
    left, right, top, bottom = 44, 16, 52, 30
    width = max(420, left + n_experts * bar + right)
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((12, 8), f"Expert load of the reply: {len(record)} tokens x top-{record.k} x "
              f"{len(record.layers)} layers", fill=TEXT, font=font(13))
    x = 12
    for j, layer in enumerate(record.layers):  # legend
        draw.rectangle((x, 30, x + 10, 40), fill=layer_color(j))
        draw.text((x + 14, 35), f"layer {layer}", fill=TEXT, font=font(11), anchor="lm")
        x += 74
    totals = loads.sum(dim=0) if len(record.layers) else loads.new_zeros(n_experts)
    peak = max(1, int(totals.max()) if totals.numel() else 1)
    plot_h = height - top - bottom
    base = top + plot_h
    draw.line((left, base, left + n_experts * bar, base), fill=MUTED)
    draw.text((left - 6, top), str(peak), fill=MUTED, font=font(10), anchor="rm")
    draw.text((left - 6, base), "0", fill=MUTED, font=font(10), anchor="rm")
    for e in range(n_experts):
        x0, y = left + e * bar, base
        for j in range(len(record.layers)):
            h = round(int(loads[j, e]) / peak * plot_h)
            if h:
                draw.rectangle((x0 + 1, y - h, x0 + bar - 2, y - 1), fill=layer_color(j))
            y -= h
        if n_experts <= 32 or e % max(1, n_experts // 16) == 0:
            draw.text((x0 + bar / 2, base + 4), str(e), fill=MUTED, font=font(10), anchor="ma")
    if len(record):
        uniform = float(totals.sum()) / n_experts
        y = base - round(uniform / peak * plot_h)
        for x0 in range(left, left + n_experts * bar, 8):
            draw.line((x0, y, min(x0 + 4, left + n_experts * bar), y), fill=TEXT)
    draw.text((left + n_experts * bar / 2, height - 4), "expert", fill=MUTED, font=font(10), anchor="md")
    return image
