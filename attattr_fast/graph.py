"""Attribution graphs (the paper's Algorithm 1), the released script's tree, receptive fields, faithfulness.

Input everywhere is the layer matrix a^l = Σ_h Attr_h(A^l) of the engine (`layer_attr`, [L, n, n],
row i = receiving token, column j = sending token) of one example at its real length n.

Node (l, i) is token i after encoder layer l (l = 0 is the embedding output, l = L the last layer).
An attention edge (l−1, j) → (l, i) says that layer l moved information from token j to token i;
a residual edge (l, i) → (l', i) joins a token's consecutive nodes. `attribution_graph` builds the
graph that flows into what the classifier reads after the last layer: [CLS], the terminal (L, 0), for
BERT-like heads; every token, the terminals (L, i), for a head that pools all positions (the built-in
model). The scores tell which: a head that reads position 0 only gives the last layer's other rows no
gradient, so their attributions are exactly zero.

`release_tree` rebuilds the tree that the authors' released drawing script produces, for comparison
with published figures. It differs from `attribution_graph` in these ways:

- normalisation: each layer is divided by |max| over all rows except row 0 ([CLS] as receiver), not
  by the maximum of the whole matrix; entries > 0.4 of that pass, in every layer (no `tau_last`);
- root: the token (not [CLS]) with the largest summed positive off-diagonal attribution over all
  layers, instead of the terminal (L, 0); [CLS] is not added;
- order: the root is expanded in the second-to-last layer (L−2, 0-based); the last layer is never
  read. Below, layers L−3 … 0 are walked in token order (receiver i = 1 … n−1, sender j = 0 … n−1),
  not by weight;
- growth: only tokens already in the tree receive, and an edge is added only when its sender is
  new, so every token appears once and the result is a tree (no residual edges, no [SEP] rule);
  a token added in a layer can receive again in the same layer if its position comes later;
- placement: the script's heights are kept as the node attribute `release_height` (the root at
  (L−1)/L; children of the root stay at 0, and a child of an already-expanded token goes to the
  lowest height present, so they can be negative). The node's `layer` is the layer whose matrix
  linked it (the root: L−1), which is what `graph_draw` uses for a readable picture;
- generalisation: the script hard-codes 12 layers; here L comes from the input. Ties for the root go
  to the lowest position, a layer whose normalising maximum is 0 passes nothing (the script
  would divide by zero), and with no token of positive summed attribution the tree is empty (the
  script would still pick a root).

`attribution_graph` follows the rules of the project's graph issue, its precise reading of Algorithm 1 (a
candidate pair already linked by an attention edge, in this or a higher layer, is skipped even if that edge is
later pruned for not reaching [CLS]); the tree of the released script is the other reading.

Faithfulness (`graph_faithfulness`) runs the model through its adapter with the graph's attention
entries set to zero (every head of that layer at (i, j)) and compares the drop of the target
probability with the drop from as many random entries, drawn per layer.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import networkx as nx
import numpy as np
import torch
from torch import Tensor

from attattr_fast.adapters import EncoderAdapter, adapter_for
from attattr_fast.errors import AttAttrError
from attattr_fast.inputs import validate_inputs

log = logging.getLogger(__name__)

METHODS = ("algorithm1", "release")
READOUTS = ("first", "all")  # what the classification head reads after the last layer: [CLS], or every token
RELEASE_THRESHOLD = 0.4

Node = tuple[int, int]


# -- input checks ---------------------------------------------------------------------------------
def _layer_matrices(layer_attr, tokens: Sequence[str]) -> np.ndarray:
    """layer_attr as float64 [L, n, n], checked against the tokens."""
    if isinstance(layer_attr, Tensor):
        array = layer_attr.detach().cpu().double().numpy()
    else:
        try:
            array = np.asarray(layer_attr, dtype=np.float64)
        except (TypeError, ValueError):
            raise AttAttrError("layer_attr must be a numeric array of shape [L, n, n]") from None
    if array.ndim != 3 or array.shape[1] != array.shape[2] or array.shape[0] < 1 or array.shape[1] < 1:
        raise AttAttrError(f"layer_attr must have shape [L, n, n] with L, n >= 1, got {list(array.shape)}")
    if not np.isfinite(array).all():
        raise AttAttrError("layer_attr contains NaN or infinite values")
    if len(tokens) != array.shape[1]:
        raise AttAttrError(f"{len(tokens)} tokens for layer matrices of {array.shape[1]} tokens")
    return array


def check_tau(value, name: str = "tau") -> float:
    """A threshold in [0, 1): the share of the layer's maximum an entry must exceed."""
    try:
        tau = float(value)
    except (TypeError, ValueError):
        raise AttAttrError(f"{name} must be a number in [0, 1), got {value!r}") from None
    if not (np.isfinite(tau) and 0.0 <= tau < 1.0):
        raise AttAttrError(f"{name} must be a number in [0, 1), got {value!r}")
    return tau


def _add_node(graph: nx.DiGraph, layer: int, position: int, tokens: Sequence[str]) -> Node:
    node = (layer, position)
    if node not in graph:
        graph.add_node(node, token=str(tokens[position]), layer=layer, position=position)
    return node


# -- Algorithm 1 ----------------------------------------------------------------------------------
def readout_of(layer_attr) -> str:
    """"first" when the last layer's scores are zero outside row 0 (a head that reads [CLS] only leaves the
    other rows without gradient), else "all" (a head that pools every token)."""
    last = np.asarray(layer_attr[-1])
    return "all" if np.any(last[1:] != 0) else "first"


def attribution_graph(
    layer_attr,
    tokens: Sequence[str],
    tau: float = 0.4,
    tau_last: float | None = None,
    sep_token: str | None = "[SEP]",
    readout: str | None = None,
) -> nx.DiGraph:
    """The attribution graph of one example (the paper's Algorithm 1, rules made precise).

    Args:
        layer_attr: [L, n, n] (Tensor or array) layer matrices, sum over heads; row i receives, column
            j sends. One example at its real length.
        tokens: the n tokens.
        tau: an entry of layers 1 … L−1 becomes a candidate edge when it is > 0 and above tau times the
            layer's maximum (default 0.4).
        tau_last: the same threshold for the last layer (None: 0.0, every positive entry, when the readout
            is [CLS], whose row is all the last layer passes on; tau when the head reads every token).
        sep_token: token whose nodes are removed while they have no incoming edge (None: keep them).
        readout: what the classifier reads after the last layer: "first" ([CLS], the terminal (L, 0)) or
            "all" (every token, the terminals (L, i)); None: from the scores (`readout_of`).

    Returns:
        networkx.DiGraph over nodes (l, i), l = 0 … L, with node attributes token, layer, position and
        edge attributes weight (the layer matrix entry; 0.0 for residual edges), kind ("attention" or
        "residual") and, for attention edges, encoder_layer (l−1, the 0-based layer whose attention it
        is). graph.graph holds method, tau, tau_last, tokens, n_layers, readout, roots (the terminals in
        the graph) and root ((L, 0) for the readout "first", else None).
    """
    matrices = _layer_matrices(layer_attr, tokens)
    readout = readout_of(matrices) if readout is None else readout
    if readout not in READOUTS:
        raise AttAttrError(f"unknown readout {readout!r}; choose one of {', '.join(READOUTS)}")
    tau = check_tau(tau, "tau")
    tau_last = check_tau((0.0 if readout == "first" else tau) if tau_last is None else tau_last, "tau_last")
    n_layers, n, _ = matrices.shape
    terminals = [(n_layers, 0)] if readout == "first" else [(n_layers, i) for i in range(n)]
    graph = nx.DiGraph(method="algorithm1", tau=tau, tau_last=tau_last, sep_token=sep_token,
                       tokens=[str(t) for t in tokens], n_layers=n_layers, readout=readout,
                       root=terminals[0] if readout == "first" else None)  # fmt: skip
    off_diagonal = ~np.eye(n, dtype=bool)
    linked: set[frozenset[int]] = set()  # unordered token pairs that already have an attention edge
    for layer in range(n_layers, 0, -1):
        a = matrices[layer - 1]
        threshold = tau_last if layer == n_layers else tau
        top = a.max()
        if top <= 0:
            continue
        receivers, senders = np.nonzero(off_diagonal & (a > 0) & (a / top > threshold))
        values = a[receivers, senders]
        # strongest first; equal values in (i, j) order, so the walk does not depend on numpy's sort
        for k in np.lexsort((senders, receivers, -values)):
            i, j = int(receivers[k]), int(senders[k])
            pair = frozenset((i, j))
            if pair in linked:
                continue
            linked.add(pair)
            source = _add_node(graph, layer - 1, j, tokens)
            target = _add_node(graph, layer, i, tokens)
            graph.add_edge(source, target, weight=float(a[i, j]), kind="attention", encoder_layer=layer - 1)
    if readout == "first":
        _add_node(graph, n_layers, 0, tokens)
    else:  # a token's last node reaches the pooled output through its own residual stream
        for position in {position for _, position in graph.nodes}:
            _add_node(graph, n_layers, position, tokens)
    layers_of: dict[int, list[int]] = defaultdict(list)
    for layer, position in graph.nodes:
        layers_of[position].append(layer)
    for position, layers in layers_of.items():
        layers.sort()
        for low, high in zip(layers, layers[1:]):
            graph.add_edge((low, position), (high, position), weight=0.0, kind="residual")
    roots = [node for node in terminals if node in graph]
    reaching = set(roots).union(*(nx.ancestors(graph, root) for root in roots))
    graph.remove_nodes_from([v for v in list(graph) if v not in reaching])
    if sep_token is not None:
        while True:
            leaves = [v for v, d in graph.nodes(data=True) if d["token"] == sep_token and graph.in_degree(v) == 0]
            if not leaves:
                break
            graph.remove_nodes_from(leaves)
    graph.graph["roots"] = [node for node in roots if node in graph]  # a [SEP] terminal may have gone
    return graph


# -- the released script's tree ----------------------------------------------------------------------
def release_tree(layer_attr, tokens: Sequence[str], threshold: float = RELEASE_THRESHOLD) -> nx.DiGraph:
    """The tree that the authors' released drawing script builds (differences: module docstring).

    Args:
        layer_attr: [L, n, n] layer matrices of one example (L >= 2).
        tokens: the n tokens.
        threshold: share of the layer's normalising maximum an entry must exceed (default 0.4).

    Returns:
        networkx.DiGraph over nodes (layer, i), one per token in the tree; node attributes token, layer,
        position, release_height; attention edges sender → receiver with weight (the layer matrix entry),
        proportion (the normalised entry), kind "attention" and encoder_layer (0-based). graph.graph
        holds method "release", tau, tokens, n_layers and root (None when no token has positive
        summed attribution, in which case the graph is empty).
    """
    matrices = _layer_matrices(layer_attr, tokens)
    threshold = check_tau(threshold, "threshold")
    n_layers, n, _ = matrices.shape
    if n_layers < 2:
        raise AttAttrError("the release tree needs at least 2 layers (it starts at the second-to-last)")
    graph = nx.DiGraph(method="release", tau=threshold, tokens=[str(t) for t in tokens], n_layers=n_layers,
                       root=None)  # fmt: skip
    proportion = np.zeros_like(matrices)
    for layer in range(n_layers):
        scale = abs(matrices[layer, 1:, :].max()) if n > 1 else 0.0
        if scale > 0:
            proportion[layer] = matrices[layer] / scale
    passes = proportion > threshold

    combined = matrices.sum(0)
    combined = np.where((combined > 0) & ~np.eye(n, dtype=bool), combined, 0.0)
    combined[0] = 0.0
    received = combined.sum(1)
    if received.max() <= 0:
        log.warning("release tree: no token has positive summed attribution; the tree is empty")
        return graph
    root = int(np.argmax(received))  # first maximum: ties go to the lowest position

    state = [-1] * n  # -1: not in the tree, 0: in the tree, not yet expanded, 1: expanded
    height = [0.0] * n
    level = {root: n_layers - 1}
    state[root] = 0
    height[root] = (n_layers - 1) / n_layers
    edges: list[tuple[int, int, int]] = []  # (receiver, sender, 0-based layer)
    top_layer = n_layers - 2
    for j in range(n):
        if j != root and passes[top_layer, root, j]:
            state[j], state[root] = 0, 1
            level[j] = top_layer
            edges.append((root, j, top_layer))
    for layer in range(n_layers - 3, -1, -1):
        for i in range(1, n):
            for j in range(n):
                if not passes[layer, i, j] or state[i] == -1 or state[j] != -1:
                    continue  # an edge needs a receiver in the tree and a sender that is new
                if state[i] == 0:
                    state[i] = 1
                    height[j] = (height[i] * n_layers - 1) / n_layers
                else:
                    height[j] = min(height)
                state[j] = 0
                level[j] = layer
                edges.append((i, j, layer))

    graph.graph["root"] = (level[root], root)
    for position, layer in level.items():
        _add_node(graph, layer, position, tokens)
        graph.nodes[(layer, position)]["release_height"] = height[position]
    for i, j, layer in edges:
        graph.add_edge((level[j], j), (level[i], i), weight=float(matrices[layer, i, j]),
                       proportion=float(proportion[layer, i, j]), kind="attention", encoder_layer=layer)  # fmt: skip
    return graph


def build_graph(
    layer_attr,
    tokens: Sequence[str],
    method: str = "algorithm1",
    tau: float = 0.4,
    tau_last: float | None = None,
    sep_token: str | None = "[SEP]",
    readout: str | None = None,
) -> nx.DiGraph:
    """`attribution_graph` (method "algorithm1") or `release_tree` (method "release", threshold tau)."""
    if method == "algorithm1":
        return attribution_graph(layer_attr, tokens, tau=tau, tau_last=tau_last, sep_token=sep_token,
                                 readout=readout)
    if method == "release":
        return release_tree(layer_attr, tokens, threshold=tau)
    raise AttAttrError(f"unknown graph method {method!r}; choose one of {', '.join(METHODS)}")


def graphs_from_result(result, tokens: Sequence[Sequence[str]], **options) -> list[nx.DiGraph]:
    """One graph per example of an `AttributionResult` computed for every layer.

    Args:
        result: AttributionResult with layer_attr [B, L, n, n] of every layer (`layers` in any order).
        tokens: the real tokens of each example (B lists).
        options: passed to `build_graph` (method, tau, tau_last, sep_token, readout).
    """
    order = layer_order(result.layers, result.model_layers)
    if len(tokens) != result.layer_attr.shape[0]:
        raise AttAttrError(f"{len(tokens)} token lists for {result.layer_attr.shape[0]} examples")
    graphs = []
    for b, toks in enumerate(tokens):
        n = int(result.lengths[b]) if result.lengths is not None else result.layer_attr.shape[-1]
        graphs.append(build_graph(result.layer_attr[b, order, :n, :n], list(toks)[:n], **options))
    return graphs


def layer_order(layers: Sequence[int], model_layers: int | None) -> list[int]:
    """Positions of layers 0, 1, …, L−1 in `layers` (scores stored in any order): the graph walks down from the
    model's last layer, so it needs the scores of every layer."""
    if model_layers is None:
        raise AttAttrError("these scores do not say how many layers the model has, which the attribution graph "
                           "needs; attribute again with this version of attattr-fast")
    layers = list(layers)
    if sorted(layers) != list(range(model_layers)):
        raise AttAttrError(f"the attribution graph needs the scores of all {model_layers} layers of the model "
                           f"(0..{model_layers - 1}), got layers {layers}; attribute without --layers")
    return [layers.index(layer) for layer in range(model_layers)]


def attention_edges(graph: nx.DiGraph) -> list[tuple[int, int, int, float]]:
    """(encoder_layer, receiver i, sender j, weight) of every attention edge, by layer then (i, j)."""
    rows = [(d["encoder_layer"], v[1], u[1], d["weight"])
            for u, v, d in graph.edges(data=True) if d["kind"] == "attention"]  # fmt: skip
    return sorted(rows)


# -- JSON (node-link) -----------------------------------------------------------------------------
def graph_to_json(graph: nx.DiGraph, **meta) -> dict:
    """Node-link data (networkx's layout, edges under "edges"); `meta` goes into data["graph"]."""
    data = nx.node_link_data(graph, edges="edges")
    data["graph"] = {**_jsonable(data["graph"]), **_jsonable(meta)}
    for node in data["nodes"]:
        node["id"] = list(node["id"])
    for edge in data["edges"]:
        edge["source"], edge["target"] = list(edge["source"]), list(edge["target"])
    return data


def graph_from_json(data: Mapping) -> nx.DiGraph:
    """The inverse of `graph_to_json`: node ids back to (layer, position) tuples."""
    try:
        data = {**data, "nodes": [{**n, "id": tuple(n["id"])} for n in data["nodes"]],
                "edges": [{**e, "source": tuple(e["source"]), "target": tuple(e["target"])} for e in data["edges"]]}
        graph = nx.node_link_graph(data, directed=True, edges="edges")
    except (KeyError, TypeError, nx.NetworkXError) as exc:
        raise AttAttrError(f"not an attribution graph in node-link JSON ({exc})") from None
    root = graph.graph.get("root")
    graph.graph["root"] = tuple(root) if root is not None else None
    if "roots" in graph.graph:
        graph.graph["roots"] = [tuple(node) for node in graph.graph["roots"]]
    return graph


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


# -- receptive field (the paper's Figure 4) ----------------------------------------------------------
@dataclass
class ReceptiveField:
    """|i − j| of the attention edges of a set of graphs, per 0-based encoder layer."""

    distances: list[list[int]]  # [L] lists of distances
    n_graphs: int

    @property
    def n_layers(self) -> int:
        return len(self.distances)

    def mean(self) -> list[float | None]:
        """Mean distance per layer (None for a layer without edges)."""
        return [float(np.mean(d)) if d else None for d in self.distances]

    def histogram(self) -> list[dict[int, int]]:
        """Count of every distance per layer."""
        return [dict(sorted(zip(*np.unique(d, return_counts=True)))) if d else {} for d in self.distances]

    def to_json(self) -> dict:
        means = self.mean()
        return {
            "n_graphs": self.n_graphs,
            "layers": [
                {"layer": layer, "edges": len(d), "mean_distance": means[layer],
                 "histogram": {str(int(k)): int(v) for k, v in hist.items()}}
                for layer, (d, hist) in enumerate(zip(self.distances, self.histogram()))
            ],
        }  # fmt: skip


def receptive_field(graphs: Iterable[nx.DiGraph]) -> ReceptiveField:
    """Distances |i − j| of the attention edges of `graphs` (all with the same number of layers)."""
    distances: list[list[int]] | None = None
    count = 0
    for graph in graphs:
        n_layers = int(graph.graph["n_layers"])
        if distances is None:
            distances = [[] for _ in range(n_layers)]
        elif n_layers != len(distances):
            raise AttAttrError(f"graphs of {len(distances)} and {n_layers} layers cannot be pooled")
        for layer, i, j, _ in attention_edges(graph):
            distances[layer].append(abs(i - j))
        count += 1
    if distances is None:
        raise AttAttrError("no graphs for the receptive field")
    return ReceptiveField(distances, count)


# -- faithfulness -----------------------------------------------------------------------------------
@torch.no_grad()
def forward_with_attention_edits(
    model: torch.nn.Module | EncoderAdapter,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    token_type_ids: Tensor | None = None,
    keep: Mapping[int, Tensor] | None = None,
) -> Tensor:
    """Logits [B, C] of the model with some attention probabilities removed.

    Args:
        model: a supported classifier or its adapter.
        input_ids: LongTensor [B, n].
        attention_mask: [B, n] of 1/0 (None: no padding).
        token_type_ids: [B, n] (None: all 0).
        keep: {0-based layer: [B, n, n]} multipliers of every head's post-softmax attention A^l (0 removes
            the entry (i, j); rows are not renormalised). Layers not named run unchanged.

    Returns:
        float32 logits [B, C], computed through the adapter's functions.
    """
    adapter = adapter_for(model)
    keep = dict(keep or {})
    batch, n = input_ids.shape
    for layer, mask in keep.items():
        if not 0 <= layer < adapter.n_layers:
            raise AttAttrError(f"layer {layer} out of range; the model has layers 0..{adapter.n_layers - 1}")
        if tuple(mask.shape) != (batch, n, n):
            raise AttAttrError(f"keep[{layer}] must have shape {[batch, n, n]}, got {list(mask.shape)}")
    weights = adapter.weights()
    device = adapter.device
    input_ids = input_ids.to(device)
    attention_mask = None if attention_mask is None else attention_mask.to(device)
    token_type_ids = None if token_type_ids is None else token_type_ids.to(device)
    x = adapter.embed(input_ids, token_type_ids, attention_mask, weights.dtype)
    bias = adapter.mask_bias(attention_mask, weights.dtype)
    for layer in range(adapter.n_layers):
        lw = weights.layers[layer]
        q, k, v = adapter.project_qkv(lw, x)
        probs, _ = adapter.attention_probs(q, k, bias)
        if layer in keep:
            probs = probs * keep[layer].to(device=device, dtype=probs.dtype).unsqueeze(1)  # same for every head
        x = adapter.layer_output(lw, weights.layer_gates[layer], probs @ v, x)
    return adapter.classify(weights, x, attention_mask).float()


@dataclass
class Faithfulness:
    """Target-probability drops from removing the graph's attention entries vs as many random ones."""

    prob: float  # F at the real input
    graph_prob: float  # F with the graph's entries removed
    graph_drop: float  # prob − graph_prob
    random_drop: float  # mean over the draws of prob − F(random entries removed)
    random_drop_std: float
    n_edges: int
    edges_per_layer: list[int]
    draws: int
    target: int

    def to_json(self) -> dict:
        return asdict(self)


def graph_faithfulness(
    model: torch.nn.Module | EncoderAdapter,
    graph: nx.DiGraph,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    token_type_ids: Tensor | None = None,
    target: int | None = None,
    draws: int = 20,
    seed: int = 0,
) -> Faithfulness:
    """Remove the graph's attention entries and measure the drop of the target probability.

    Every attention edge (l−1, j) → (l, i) zeroes A^{l−1}[:, i, j] (all heads). The control removes the
    same number of entries in each layer, drawn uniformly without replacement from the n(n−1)
    off-diagonal (i, j), `draws` times; all rows run in one batch. In the last layer of a graph into [CLS]
    (readout "first") it draws from [CLS]'s row only, the entries there that can change the output.

    Args:
        model: the classifier (or its adapter) the graph was computed for.
        graph: from `attribution_graph` or `release_tree` for this example.
        input_ids: [n] or [1, n], one example; padding is cut off with `attention_mask`.
        attention_mask, token_type_ids: [n] or [1, n] (optional).
        target: the class whose probability is measured (None: the predicted class).
        draws: random draws (default 20).
        seed: seed of the random draws.

    Returns:
        Faithfulness.
    """
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise AttAttrError(f"draws must be an integer >= 1, got {draws!r}")
    if target is not None and (isinstance(target, bool) or not isinstance(target, int)):
        raise AttAttrError(f"target must be None or a class index, got {target!r}")
    if not isinstance(input_ids, Tensor) or input_ids.dim() not in (1, 2):
        raise AttAttrError("input_ids must be a LongTensor of shape [n] or [1, n]")
    ids = input_ids.reshape(1, -1) if input_ids.dim() == 1 else input_ids
    if ids.shape[0] != 1:
        raise AttAttrError(f"graph_faithfulness takes one example, got a batch of {ids.shape[0]}")
    mask = None if attention_mask is None else torch.as_tensor(attention_mask).reshape(1, -1)
    types = None if token_type_ids is None else torch.as_tensor(token_type_ids).reshape(1, -1)
    adapter = adapter_for(model)
    validate_inputs(adapter, ids, mask, types, None, None)  # dtype, vocabulary, mask and segment checks
    if graph.graph.get("n_layers", adapter.n_layers) != adapter.n_layers:
        raise AttAttrError(f"the graph is of a {graph.graph['n_layers']}-layer model; this one has {adapter.n_layers}")
    n = int(mask.sum()) if mask is not None else ids.shape[1]
    ids = ids[:, :n]
    types = None if types is None else types[:, :n]
    if len(graph.graph["tokens"]) != n:
        raise AttAttrError(f"the graph has {len(graph.graph['tokens'])} tokens, the example {n}")
    edges = attention_edges(graph)
    per_layer = [0] * adapter.n_layers
    for layer, _, _, _ in edges:
        per_layer[layer] += 1

    rows = 2 + draws  # real input, graph edges removed, random draws
    keep = {layer: torch.ones(rows, n, n) for layer in range(adapter.n_layers) if per_layer[layer]}
    for layer, i, j, _ in edges:
        keep[layer][1, i, j] = 0.0
    generator = torch.Generator().manual_seed(seed)
    off_diagonal = ~torch.eye(n, dtype=torch.bool)
    cls_row = torch.zeros(n, n, dtype=torch.bool)
    cls_row[0] = off_diagonal[0]
    default_readout = "first" if graph.graph.get("method") == "algorithm1" else "all"  # graphs from before readout
    last_layer_pool = cls_row if graph.graph.get("readout", default_readout) == "first" else off_diagonal
    for layer, count in enumerate(per_layer):
        if not count:
            continue
        pool = torch.nonzero(last_layer_pool if layer == adapter.n_layers - 1 else off_diagonal)  # [m, 2] as (i, j)
        for row in range(2, rows):
            picked = pool[torch.randperm(len(pool), generator=generator)[:count]]
            keep[layer][row, picked[:, 0], picked[:, 1]] = 0.0
    logits = forward_with_attention_edits(adapter, ids.expand(rows, n), None, None if types is None else
                                          types.expand(rows, n), keep)  # fmt: skip
    probs = torch.softmax(logits, dim=-1)
    target = int(probs[0].argmax()) if target is None else int(target)
    if not 0 <= target < probs.shape[-1]:
        raise AttAttrError(f"target {target} out of range; the model has {probs.shape[-1]} classes")
    p = probs[:, target].double()
    random_drops = p[0] - p[2:]
    return Faithfulness(
        prob=float(p[0]),
        graph_prob=float(p[1]),
        graph_drop=float(p[0] - p[1]),
        random_drop=float(random_drops.mean()),
        random_drop_std=float(random_drops.std(unbiased=False)),
        n_edges=len(edges),
        edges_per_layer=per_layer,
        draws=draws,
        target=target,
    )
