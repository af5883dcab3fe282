"""Pictures of attribution graphs: PNG / SVG (matplotlib, Agg), a self-contained HTML report, receptive fields.

Layout of a graph: encoder layers bottom (embeddings) to top, tokens left to right in input order,
so the terminal [CLS] node sits at the top left. Attention edges go from the sending token one layer
down to the receiving token, so information flows upward and no arrowheads are needed; their width
and darkness grow with the attribution weight. Residual edges are thin and light. Figures are built
on `matplotlib.figure.Figure` (no pyplot state), so drawing works the same from a script, a test or
a server, and nothing is shown on screen.

The HTML report needs no network: the graph is inline SVG and the heatmaps are PNG data URIs.
"""

from __future__ import annotations

import base64
import html
import io
import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import networkx as nx
import numpy as np
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch

from attattr_fast.errors import AttAttrError
from attattr_fast.graph import ReceptiveField, attention_edges

FORMATS = ("png", "svg")
EDGE_COLOR = "#1f4e9c"
RESIDUAL_COLOR = "#c9c9c9"
ROOT_COLOR = "#d62728"
NODE_COLOR = "#4a4a4a"
SPECIAL_TOKENS = ("[CLS]", "[SEP]", "<s>", "</s>", "[PAD]", "<pad>")


def _to_numpy(matrix) -> np.ndarray:
    if hasattr(matrix, "detach"):
        return matrix.detach().cpu().float().numpy()
    return np.asarray(matrix, dtype=np.float32)


# -- the graph --------------------------------------------------------------------------------------
def graph_figure(graph: nx.DiGraph, title: str | None = None) -> Figure:
    """A matplotlib Figure of the graph (readable up to about 60 tokens at its natural size).

    Args:
        graph: from `attattr_fast.graph.attribution_graph` or `release_tree`.
        title: first title line (e.g. the text and the prediction); the method line is added below.
    """
    tokens = list(graph.graph["tokens"])
    n_layers = int(graph.graph["n_layers"])
    n = len(tokens)
    width = float(np.clip(0.32 * n + 2.8, 6.0, 40.0))
    label_room = 0.075 * max(len(t) for t in tokens) + 0.4  # rotated token labels under the axis
    height = 0.8 * (n_layers + 1) + 1.3 + label_room
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    ax = fig.add_subplot()

    in_graph = {position for _, position in graph.nodes}
    for position in in_graph:  # a faint column under each token that takes part
        ax.axvline(position, color="#f0f0f0", lw=0.8, zorder=0)

    edges = attention_edges(graph)
    top = max((w for *_, w in edges), default=0.0)
    residual, attention, shares, bends = [], [], [], []
    for u, v, data in graph.edges(data=True):
        (lu, pu), (lv, pv) = u, v
        if data["kind"] == "residual":
            residual.append([(pu, lu), (pv, lv)])
        elif lu == lv:
            bends.append((pu, pv, lu))  # same-row edge (release tree): an arc, or it would hide behind the nodes
        else:
            attention.append([(pu, lu), (pv, lv)])
            shares.append(data["weight"] / top if top > 0 else 1.0)
    # One collection per kind: thousands of separate patches make a 60-token picture slow to render.
    ax.add_collection(LineCollection(residual, colors=RESIDUAL_COLOR, linewidths=1.2, zorder=1, capstyle="round"))
    order = np.argsort(shares, kind="stable")  # strongest drawn last, on top
    shares = np.asarray(shares)[order]
    colors = [(*matplotlib.colors.to_rgb(EDGE_COLOR), 0.3 + 0.7 * s) for s in shares]
    ax.add_collection(LineCollection([attention[k] for k in order], colors=colors, linewidths=0.6 + 3.4 * shares,
                                     zorder=2, capstyle="round"))  # fmt: skip
    for pu, pv, level in bends:
        ax.add_patch(FancyArrowPatch((pu, level), (pv, level), arrowstyle="-", connectionstyle="arc3,rad=0.35",
                                     lw=1.2, color=EDGE_COLOR, alpha=0.7, zorder=2))  # fmt: skip

    root = graph.graph.get("root")
    root = tuple(root) if root is not None else None
    roots = {tuple(node) for node in graph.graph.get("roots", [root] if root is not None else [])}
    xs, ys, colors = [], [], []
    for node, data in graph.nodes(data=True):
        xs.append(data["position"])
        ys.append(data["layer"])
        colors.append(ROOT_COLOR if node in roots else NODE_COLOR)
    size = 42 if n <= 30 else 26
    ax.scatter(xs, ys, s=size, c=colors, edgecolors="white", linewidths=0.8, zorder=5)
    if root is not None and root in graph:  # one terminal: named (a pooling head's terminals are every token)
        ax.annotate(graph.nodes[root]["token"], (root[1], root[0]), xytext=(0, 7), textcoords="offset points",
                    ha="center", va="bottom", fontsize=9, color=ROOT_COLOR, fontweight="bold", zorder=6,
                    parse_math=False)

    ax.set_xticks(range(n))
    rotate = n > 12 or max(len(t) for t in tokens) > 6
    # parse_math=False: a "$" in a token or the text is a dollar sign, not the start of a formula
    ax.set_xticklabels(tokens, rotation=90 if rotate else 0, fontsize=9 if n <= 40 else 8, parse_math=False)
    for position, label in enumerate(ax.get_xticklabels()):
        label.set_color("black" if position in in_graph else "#a0a0a0")
        if tokens[position] in SPECIAL_TOKENS:
            label.set_fontstyle("italic")
    ax.set_yticks(range(n_layers + 1))
    # node row k + 1 is the output of 0-based encoder layer k, as the CLI and API number layers
    ax.set_yticklabels(["embeddings"] + [f"layer {layer}" for layer in range(n_layers)], fontsize=9)
    ax.set_xlim(-0.7, n - 0.3)
    ax.set_ylim(-0.45, n_layers + 0.55)
    ax.tick_params(length=0)
    for side in ("top", "right", "left", "bottom"):
        ax.spines[side].set_visible(False)

    method = graph.graph.get("method", "algorithm1")
    if method == "release":
        rule = f"release script tree, threshold {graph.graph.get('tau', 0.4):g}"
    else:
        rule = f"Algorithm 1, τ = {graph.graph.get('tau', 0.4):g}, τ_last = {graph.graph.get('tau_last', 0.0):g}"
        if graph.graph.get("readout") == "all":
            rule += " · into every token (the head pools them all)"
    summary = f"{rule} · {len(edges)} attention edges · width ∝ attribution (max {top:.3g}) · grey: residual"
    lines = ([] if title is None else title.splitlines()) + [summary]
    chars = int(width * 12)  # about what fits across the figure at 10 pt
    fig.suptitle("\n".join(textwrap.fill(line, chars) for line in lines), fontsize=10, parse_math=False)
    return fig


def render_figure(fig: Figure, fmt: str) -> bytes:
    """The figure as PNG or SVG bytes (SVG keeps text as text and has stable ids)."""
    if fmt not in FORMATS:
        raise AttAttrError(f"unknown image format {fmt!r}; choose one of {', '.join(FORMATS)}")
    buffer = io.BytesIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "attattr-fast"}):
        fig.savefig(buffer, format=fmt, metadata={"Date": None} if fmt == "svg" else None)
    return buffer.getvalue()


def render_graph(graph: nx.DiGraph, fmt: str = "png", title: str | None = None) -> bytes:
    """PNG or SVG bytes of `graph_figure(graph, title)`."""
    return render_figure(graph_figure(graph, title), fmt)


def save_graph(graph: nx.DiGraph, path: str | Path, fmt: str | None = None, title: str | None = None) -> Path:
    """Draw the graph to `path` (format from `fmt` or the suffix), written atomically."""
    path = Path(path)
    fmt = fmt or path.suffix.lstrip(".").lower()
    write_atomic(path, render_graph(graph, fmt, title))
    return path


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write under a temporary name in the same folder, then rename: readers never see half a file."""
    from attattr_fast.results import atomic_write_bytes

    path = Path(path)
    if not path.parent.is_dir():
        raise AttAttrError(f"cannot write {path}: folder {path.parent} does not exist")
    if path.is_dir():
        raise AttAttrError(f"cannot write {path}: it is a directory")
    atomic_write_bytes(path, data)


# -- receptive field --------------------------------------------------------------------------------
def receptive_field_figure(field: ReceptiveField) -> Figure:
    """Mean |i − j| per layer (left) and the share of every distance per layer (right)."""
    n_layers = field.n_layers
    means = field.mean()
    fig = Figure(figsize=(11, 0.45 * n_layers + 2.6), dpi=110, layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[1, 1.6])
    layers = np.arange(n_layers)  # 0-based encoder layers
    have = [m is not None for m in means]
    left.plot([m for m in means if m is not None], layers[have], "o-", color=EDGE_COLOR)
    for layer, (m, d) in enumerate(zip(means, field.distances)):
        if m is not None:
            left.annotate(f"{len(d)} edges", (m, layer), xytext=(6, 0), textcoords="offset points",
                          va="center", fontsize=8, color="#555555")
    left.set_xlabel("mean distance |i − j| (tokens)")
    left.set_ylabel("layer")
    left.set_yticks(layers)
    left.set_ylim(-0.5, n_layers - 0.5)
    left.set_xlim(left=0)
    left.grid(alpha=0.3)

    longest = max((max(d) for d in field.distances if d), default=1)
    shares = np.zeros((n_layers, longest))
    for layer, d in enumerate(field.distances):
        if d:
            counts = np.bincount(np.asarray(d), minlength=longest + 1)[1:]
            shares[layer] = counts / counts.sum()
    image = right.imshow(shares, origin="lower", aspect="auto", cmap="Blues", vmin=0,
                         extent=(0.5, longest + 0.5, -0.5, n_layers - 0.5))  # fmt: skip
    right.set_xlabel("distance |i − j| (tokens)")
    right.set_yticks(layers)
    right.set_title("share of each layer's edges", fontsize=10)
    fig.colorbar(image, ax=right, shrink=0.9)
    fig.suptitle(f"Receptive field of attribution-graph edges ({field.n_graphs} examples)", fontsize=11)
    return fig


# -- HTML report --------------------------------------------------------------------------------------
def heatmap_png(matrix, cmap: str, vmin: float, vmax: float) -> bytes:
    """One pixel per entry, colour-mapped; the page scales it up without smoothing."""
    values = _to_numpy(matrix)
    norm = matplotlib.colors.Normalize(vmin=vmin, vmax=vmax if vmax > vmin else vmin + 1e-12)
    rgba = matplotlib.colormaps[cmap](norm(values), bytes=True)
    buffer = io.BytesIO()
    matplotlib.image.imsave(buffer, rgba, format="png")
    return buffer.getvalue()


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _heatmap_block(matrix, tokens: Sequence[str], cmap: str, symmetric: bool, caption: str, cell: int) -> str:
    values = _to_numpy(matrix)
    if symmetric:
        scale = float(np.abs(values).max())
        vmin, vmax, legend = -scale, scale, f"±{scale:.3g}"
    else:
        vmin, vmax = 0.0, float(values.max())
        legend = f"0–{vmax:.3g}"
    n = len(tokens)
    labels = [html.escape(t) for t in tokens]
    cols = "".join(f'<span title="{t}">{t}</span>' for t in labels)
    rows = "".join(f'<span title="{t}">{t}</span>' for t in labels)
    uri = _data_uri(heatmap_png(values, cmap, vmin, vmax))
    return (
        f'<figure class="hm" style="--n:{n};--cell:{cell}px">'
        f'<figcaption>{html.escape(caption)} <small>{legend}</small></figcaption>'
        f'<div class="grid"><div></div><div class="cols">{cols}</div><div class="rows">{rows}</div>'
        f'<img src="{uri}" width="{n * cell}" height="{n * cell}" alt="{html.escape(caption)}"></div></figure>'
    )


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em;margin-bottom:.2em} h2{font-size:1.15em;margin-top:1.6em}
.meta{color:#444;margin:.2em 0} .note{color:#555;font-size:.9em;max-width:60em}
#graph svg{max-width:100%;height:auto}
details{margin:.6em 0;border-top:1px solid #ddd;padding-top:.4em} summary{cursor:pointer;font-weight:600}
.layer{display:flex;flex-wrap:wrap;gap:1.2em 2em;margin-top:.6em}
.pair{display:flex;gap:.6em;border:1px solid #e4e4e4;border-radius:4px;padding:.4em}
.pair>h3{writing-mode:vertical-rl;transform:rotate(180deg);margin:0;font-size:.85em;color:#333}
figure.hm{margin:0} figcaption{font-size:.8em;color:#333;margin-bottom:.2em} figcaption small{color:#777}
.grid{display:grid;grid-template-columns:auto calc(var(--n)*var(--cell));
 grid-template-rows:auto calc(var(--n)*var(--cell))}
.cols{display:flex;align-items:flex-end} .rows{display:flex;flex-direction:column;align-items:flex-end}
.cols span{width:var(--cell);writing-mode:vertical-rl;transform:rotate(180deg);max-height:7em;overflow:hidden;
 font-size:min(var(--cell),11px);line-height:var(--cell);white-space:nowrap;text-align:left}
.rows span{height:var(--cell);line-height:var(--cell);max-width:7em;overflow:hidden;font-size:min(var(--cell),11px);
 white-space:nowrap;padding-right:2px}
.grid img{image-rendering:pixelated;image-rendering:crisp-edges;display:block}
"""


def graph_html(
    graph: nx.DiGraph,
    layer_attr,
    attention=None,
    attributions=None,
    title: str = "Attribution graph",
    details: Sequence[str] = (),
) -> str:
    """A self-contained HTML page: the graph, then per layer the heatmaps of every head side by side.

    Args:
        graph: the example's graph; its tokens label the heatmaps.
        layer_attr: [L, n, n] layer matrices (sum over heads).
        attention: [L, H, n, n] attention probabilities, or None.
        attributions: [L, H, n, n] attribution scores, or None. Per-head panels need both.
        title: page heading (e.g. the text).
        details: lines shown under the heading (prediction, settings).

    Returns:
        The page as a string; no external resources.
    """
    tokens = list(graph.graph["tokens"])
    layer_attr = _to_numpy(layer_attr)
    n_layers, n = layer_attr.shape[0], len(tokens)
    if layer_attr.shape[1:] != (n, n):
        raise AttAttrError(f"layer_attr {list(layer_attr.shape)} does not match {n} tokens")
    if (attention is None) != (attributions is None):
        raise AttAttrError("per-head heatmaps need both attention and attributions")
    if attention is not None:
        attention, attributions = _to_numpy(attention), _to_numpy(attributions)
        if attention.shape != attributions.shape or attention.shape[0] != n_layers or attention.shape[2:] != (n, n):
            raise AttAttrError(f"attention {list(attention.shape)} and attributions {list(attributions.shape)} "
                               f"do not match [L={n_layers}, H, n={n}, n]")  # fmt: skip
    cell = int(np.clip(360 // max(n, 1), 3, 14))
    svg = render_graph(graph, "svg").decode("utf-8")
    svg = svg[svg.index("<svg"):]  # drop the XML prologue and doctype; the page declares its encoding

    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        *[f'<p class="meta">{html.escape(line)}</p>' for line in details],
        f'<section id="graph"><h2>Attribution graph</h2>{svg}</section>',
        '<section id="heatmaps"><h2>Attention and attribution, per layer and head</h2>',
        '<p class="note">Rows are the receiving token (query i), columns the sending token (key j). '
        "Attention probabilities in blue, scaled to each head's maximum; attribution scores in red "
        "(positive) and blue (negative), symmetric around zero for each head. The layer sum is the "
        "matrix the graph is built from.</p>",
    ]  # fmt: skip
    if attention is None:
        parts.append('<p class="note"><strong>Per-head heatmaps are not available:</strong> these results hold '
                     "only the layer sums (attributed with output=\"reduced\").</p>")
    for layer in range(n_layers - 1, -1, -1):
        open_attr = " open" if layer == n_layers - 1 else ""
        parts.append(f"<details{open_attr}><summary>layer {layer}</summary><div class=\"layer\">")
        parts.append('<div class="pair"><h3>sum over heads</h3>'
                     + _heatmap_block(layer_attr[layer], tokens, "RdBu_r", True, "attribution", cell) + "</div>")
        if attention is not None:
            for head in range(attention.shape[1]):
                parts.append(
                    f'<div class="pair"><h3>head {head + 1}</h3>'
                    + _heatmap_block(attention[layer, head], tokens, "Blues", False, "attention", cell)
                    + _heatmap_block(attributions[layer, head], tokens, "RdBu_r", True, "attribution", cell)
                    + "</div>"
                )
        parts.append("</div></details>")
    parts.append("</section></body></html>")
    return "\n".join(parts)
