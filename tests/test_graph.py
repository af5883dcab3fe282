"""Attribution graphs: hand-worked Algorithm 1 and release trees, drawing, receptive fields, faithfulness, CLI."""

import io
import json
import re

import networkx as nx
import numpy as np
import pytest
import torch

from attattr_fast.api import AttentionAttribution
from attattr_fast.errors import AttAttrError
from attattr_fast.graph import (
    attention_edges,
    attribution_graph,
    forward_with_attention_edits,
    graph_faithfulness,
    graph_from_json,
    graph_to_json,
    graphs_from_result,
    readout_of,
    receptive_field,
    release_tree,
)

from conftest import padded_batch, tiny_classifier
from tolerances import ADAPTER_ATOL


def edges_of(graph):
    """{(source, target): (kind, weight)} for exact comparison with hand-worked answers."""
    return {(u, v): (d["kind"], pytest.approx(d["weight"])) for u, v, d in graph.edges(data=True)}


# -- Algorithm 1, worked by hand ------------------------------------------------------------------------
def test_duplicates_reversed_pairs_and_unreachable_nodes():
    tokens = ["[CLS]", "a", "b", "c"]
    a = np.zeros((2, 4, 4))
    # last layer (tau_last = 0): every positive off-diagonal entry is a candidate, strongest first
    a[1, 0, 1] = 0.9  # (1,1) → (2,0)
    a[1, 1, 0] = 0.5  # pair {0,1} already linked above: skipped
    a[1, 0, 2] = 0.3  # (1,2) → (2,0)
    a[1, 2, 3] = 0.2  # (1,3) → (2,2): (2,2) never reaches [CLS], pruned; pair {2,3} still counts as used
    a[1, 3, 3] = 1.0  # diagonal: never an edge
    # layer 1 (tau = 0.4, maximum 1.0)
    a[0, 1, 3] = 1.0  # (0,3) → (1,1)
    a[0, 2, 3] = 0.8  # pair {2,3} used in layer 2: skipped
    a[0, 2, 1] = 0.6  # (0,1) → (1,2)
    a[0, 1, 2] = 0.5  # reversed pair of the edge just added: skipped
    a[0, 3, 0] = 0.39  # 0.39 of the maximum: below tau
    a[0, 0, 3] = -2.0  # negative: never an edge
    graph = attribution_graph(a, tokens, readout="first")  # the scores alone would say "all": row 2 is not zero
    assert set(graph.nodes) == {(2, 0), (1, 1), (1, 2), (0, 3), (0, 1)}
    assert edges_of(graph) == {
        ((1, 1), (2, 0)): ("attention", 0.9),
        ((1, 2), (2, 0)): ("attention", 0.3),
        ((0, 3), (1, 1)): ("attention", 1.0),
        ((0, 1), (1, 2)): ("attention", 0.6),
        ((0, 1), (1, 1)): ("residual", 0.0),
    }
    assert graph.nodes[(0, 3)] == {"token": "c", "layer": 0, "position": 3}
    assert graph.edges[(0, 3), (1, 1)]["encoder_layer"] == 0
    assert graph.graph["root"] == (2, 0)
    assert attention_edges(graph) == [(0, 1, 3, 1.0), (0, 2, 1, 0.6), (1, 0, 1, 0.9), (1, 0, 2, 0.3)]


def test_the_diagonal_sets_the_maximum_and_the_threshold_is_strict():
    a = np.zeros((1, 3, 3))
    a[0, 1, 1] = 2.0  # maximum of the layer, though not an edge
    a[0, 0, 1] = 1.0  # 0.5 of the maximum
    a[0, 0, 2] = 0.8  # exactly 0.4 of the maximum: not above
    a[0, 2, 0] = 0.5
    for tau in (0.0, 0.9):  # with one layer only tau_last applies
        graph = attribution_graph(a, ["[CLS]", "x", "y"], tau=tau, tau_last=0.4, readout="first")
        assert edges_of(graph) == {((0, 1), (1, 0)): ("attention", 1.0)}


def test_ties_go_to_the_lower_pair():
    a = np.zeros((1, 3, 3))
    a[0, 0, 1] = a[0, 1, 0] = 0.5  # same value: (0,1) comes first, (1,0) is its reversed pair
    graph = attribution_graph(a, ["[CLS]", "x", "y"], readout="first")
    assert edges_of(graph) == {((0, 1), (1, 0)): ("attention", 0.5)}


@pytest.mark.parametrize("negative_layer", [
    -np.arange(1.0, 10.0).reshape(3, 3),  # every entry negative
    -np.abs(np.arange(9.0).reshape(3, 3) - 4.0) * (1 - np.eye(3)),  # maximum exactly 0 (the diagonal)
])  # fmt: skip
def test_a_layer_without_positive_entries_adds_nothing(negative_layer):
    a = np.zeros((3, 3, 3))
    a[2, 0, 1] = 0.5  # (2,1) → (3,0)
    a[1] = negative_layer
    a[0, 1, 2] = 0.3  # (0,2) → (1,1), joined to (2,1) by a residual edge
    a[0, 2, 0] = -1.0
    graph = attribution_graph(a, ["[CLS]", "a", "b"])
    assert edges_of(graph) == {
        ((2, 1), (3, 0)): ("attention", 0.5),
        ((0, 2), (1, 1)): ("attention", 0.3),
        ((1, 1), (2, 1)): ("residual", 0.0),
    }


def test_sep_leaves_are_removed_repeatedly():
    tokens = ["[CLS]", "a", "[SEP]", "b", "[SEP]"]
    a = np.zeros((2, 5, 5))
    a[1, 0, 4] = 1.0  # (1,4) → (2,0): second [SEP], which receives nothing below
    a[1, 0, 2] = 0.7  # (1,2) → (2,0): first [SEP], which receives from b in layer 1
    a[1, 0, 1] = 0.6  # (1,1) → (2,0)
    a[0, 1, 4] = 1.0  # (0,4) → (1,1): a [SEP] leaf
    a[0, 2, 3] = 0.8  # (0,3) → (1,2)
    a[0, 3, 1] = 0.5  # (0,1) → (1,3): (1,3) does not reach [CLS]
    graph = attribution_graph(a, tokens)
    # (0,4) has no incoming edge: removed; then (1,4) has none: removed too. (1,2) receives from (0,3): kept.
    assert edges_of(graph) == {
        ((1, 2), (2, 0)): ("attention", 0.7),
        ((1, 1), (2, 0)): ("attention", 0.6),
        ((0, 3), (1, 2)): ("attention", 0.8),
        ((0, 1), (1, 1)): ("residual", 0.0),
    }
    kept = attribution_graph(a, tokens, sep_token=None)
    assert edges_of(kept) == {
        **edges_of(graph),
        ((1, 4), (2, 0)): ("attention", 1.0),
        ((0, 4), (1, 1)): ("attention", 1.0),
        ((0, 4), (1, 4)): ("residual", 0.0),
    }


def test_a_pooling_readout_ends_in_every_token():
    tokens = ["[CLS]", "a", "b", "c"]
    a = np.zeros((2, 4, 4))
    a[1, 2, 3] = 1.0  # (1,3) → (2,2): token b's last node, which the head reads
    a[1, 0, 1] = 0.3  # below tau, which the last layer takes when the head reads every token
    a[0, 2, 3] = 0.9  # pair {2,3} linked in the layer above: skipped
    a[0, 1, 3] = 0.5  # (0,3) → (1,1): reaches the output through token a's own residual stream
    graph = attribution_graph(a, tokens)
    assert graph.graph["readout"] == "all" and graph.graph["tau_last"] == 0.4 and graph.graph["root"] is None
    assert edges_of(graph) == {
        ((1, 3), (2, 2)): ("attention", 1.0),
        ((0, 3), (1, 1)): ("attention", 0.5),
        ((0, 3), (1, 3)): ("residual", 0.0),
        ((1, 3), (2, 3)): ("residual", 0.0),
        ((1, 1), (2, 1)): ("residual", 0.0),
    }
    assert graph.graph["roots"] == [(2, 1), (2, 2), (2, 3)]  # the terminals of the tokens in the graph
    into_cls = attribution_graph(a, tokens, readout="first")  # the same scores read as a [CLS] head's
    assert edges_of(into_cls) == {((1, 1), (2, 0)): ("attention", 0.3), ((0, 3), (1, 1)): ("attention", 0.5)}
    assert into_cls.graph["roots"] == [(2, 0)] and into_cls.graph["tau_last"] == 0.0


def test_the_readout_found_in_the_scores_is_what_the_head_reads(builtin):
    """Zeroing the last layer's attention outside [CLS]'s row leaves a [CLS] head's logits as they are and moves a
    pooling head's: the readout the scores give must agree, for transformers' BERT and the built-in model."""
    from attattr_fast.text import encode

    model, tokenizer = builtin
    enc = encode(tokenizer, ["A charming and funny film, though the plot drags."])
    bert = _sensitive(tiny_classifier("bert", layers=2))
    ids, mask, types = padded_batch(bert, [9], seed=2)
    for model_, (ids_, mask_, types_), expected in ((bert, (ids, mask, types), "first"),
                                                     (model, (enc.input_ids, enc.attention_mask,
                                                              enc.token_type_ids), "all")):  # fmt: skip
        n, top = ids_.shape[1], model_.config.num_hidden_layers - 1
        keep = torch.ones(1, n, n)
        keep[0, 1:] = 0.0
        plain = forward_with_attention_edits(model_, ids_, mask_, types_)
        edited = forward_with_attention_edits(model_, ids_, mask_, types_, {top: keep})
        assert torch.equal(plain, edited) == (expected == "first")
        res = AttentionAttribution(model_).attribute(ids_, mask_, types_, n_steps=2, output="reduced")
        assert readout_of(res.layer_attr[0]) == expected
        assert attribution_graph(res.layer_attr[0], enc.tokens[0] if expected == "all" else ["t"] * n).graph[
            "readout"] == expected  # fmt: skip


def test_a_graph_with_no_edges_is_the_terminal_alone():
    graph = attribution_graph(np.zeros((2, 3, 3)), ["[CLS]", "x", "[SEP]"])
    assert list(graph.nodes) == [(2, 0)] and graph.number_of_edges() == 0


@pytest.mark.parametrize("readout", ["first", "all"])
def test_invariants_on_random_matrices(readout):
    rng = np.random.default_rng(3)
    tokens = ["[CLS]"] + [f"t{i}" for i in range(1, 11)] + ["[SEP]"]
    for trial in range(5):
        a = rng.normal(size=(4, 12, 12))
        if readout == "first":
            a[3, 1:] = 0.0  # what a head that reads [CLS] only leaves in the last layer: no gradient elsewhere
        tau = (0.2, 0.4, 0.6, 0.3, 0.5)[trial]
        graph = attribution_graph(torch.tensor(a, dtype=torch.float32), tokens, tau=tau)  # readout from the scores
        assert graph.graph["readout"] == readout
        tau_last = 0.0 if readout == "first" else tau
        pairs = set()
        for layer, i, j, weight in attention_edges(graph):
            m = a[layer].max()
            threshold = tau_last if layer == 3 else tau
            assert i != j and weight > 0 and weight / m > threshold - 1e-6
            assert frozenset((i, j)) not in pairs
            pairs.add(frozenset((i, j)))
        roots = [(4, 0)] if readout == "first" else [(4, i) for i in range(12)]
        assert graph.graph["roots"] == [v for v in roots if v in graph]
        assert all(v in roots or any(nx.has_path(graph, v, r) for r in graph.graph["roots"]) for v in graph)
        assert not [v for v, d in graph.nodes(data=True) if d["token"] == "[SEP]" and graph.in_degree(v) == 0]
        # complete where nothing can pre-empt a pair: the strongest entry of the last layer is always an edge, and
        # into [CLS] every positive last-layer entry (each pair {0, j} occurs once; [SEP] only if it receives below)
        last = a[3] * (1 - np.eye(12))
        i, j = np.unravel_index(np.argmax(last if readout == "all" else last[:1]), last.shape if readout == "all"
                                else (1, 12))  # fmt: skip
        assert (3, i, j) in {(layer, r, c) for layer, r, c, _ in attention_edges(graph)}
        if readout == "first":
            into_cls = {c for layer, r, c, _ in attention_edges(graph) if layer == 3}
            senders = {c for c in range(1, 11) if last[0, c] > 0}
            assert senders <= into_cls


@pytest.mark.parametrize("bad, message", [
    (dict(tau=1.0), "tau"), (dict(tau=-0.1), "tau"), (dict(tau_last=float("nan")), "tau_last"),
    (dict(tau="x"), "tau"), (dict(layer_attr=np.zeros((2, 3, 4))), "shape"),
    (dict(layer_attr=np.full((1, 3, 3), np.nan)), "NaN"), (dict(tokens=["a", "b"]), "tokens"),
])  # fmt: skip
def test_bad_input_is_one_line_error(bad, message):
    args = {"layer_attr": np.zeros((2, 3, 3)), "tokens": ["[CLS]", "x", "[SEP]"], **bad}
    with pytest.raises(AttAttrError, match=message):
        attribution_graph(**args)


def test_json_round_trip():
    a = np.random.default_rng(0).normal(size=(3, 6, 6))
    for readout in ("first", "all"):
        graph = attribution_graph(a, ["[CLS]", "a", "b", "c", "d", "[SEP]"], tau=0.3, readout=readout)
        data = json.loads(json.dumps(graph_to_json(graph, text="x")))
        assert data["graph"]["text"] == "x" and data["graph"]["readout"] == readout
        back = graph_from_json(data)
        assert set(back.nodes) == set(graph.nodes) and edges_of(back) == edges_of(graph)
        assert back.graph["root"] == graph.graph["root"] and back.graph["roots"] == graph.graph["roots"]
    assert graph.graph["root"] is None and len(graph.graph["roots"]) > 1
    assert attribution_graph(a, graph.graph["tokens"], readout="first").graph["root"] == (3, 0)


# -- the released script's tree, worked by hand ---------------------------------------------------------
def release_example():
    a = np.zeros((3, 5, 5))
    # last layer: only counts toward the root choice; were it read as the top step, 1 and 4 would join
    a[2, 2, 1] = 1.0
    a[2, 2, 4] = 1.0
    # second-to-last layer: the root's step. Normaliser = max over rows 1.. = 1.0; row 0 is ignored
    a[1, 2, 3] = 1.0
    a[1, 2, 0] = 0.5
    a[1, 2, 1] = 0.3  # 0.3: below 0.4
    a[1, 0, 4] = 10.0
    # first layer: normaliser 2.0; walked receiver 1..4, sender 0..4
    a[0, 1, 2] = 2.0  # receiver 1 is not in the tree when its row is walked: no edge
    a[0, 2, 4] = 0.9  # root (expanded) takes new token 4; height min(...) = 0
    a[0, 3, 1] = 1.2  # 3 (in the tree, not expanded) takes new token 1 at height (0·3 − 1)/3
    a[0, 3, 4] = 1.0  # 4 is already in the tree: no edge
    a[0, 4, 2] = 0.7  # 2 is expanded: no edge
    a[0, 1, 0] = 0.3
    return a


def test_release_tree_by_hand():
    tokens = ["[CLS]", "a", "b", "c", "d"]
    # summed positive off-diagonal attribution per receiver (row 0 excluded): a 2.3, b 4.4, c 2.2, d 1.5
    tree = release_tree(release_example(), tokens)
    assert tree.graph["root"] == (2, 2)
    assert set(tree.nodes) == {(2, 2), (1, 0), (1, 3), (0, 4), (0, 1)}
    assert edges_of(tree) == {
        ((1, 0), (2, 2)): ("attention", 0.5),
        ((1, 3), (2, 2)): ("attention", 1.0),
        ((0, 4), (2, 2)): ("attention", 0.9),
        ((0, 1), (1, 3)): ("attention", 1.2),
    }
    assert tree.edges[(0, 1), (1, 3)]["proportion"] == pytest.approx(0.6)
    heights = {v: d["release_height"] for v, d in tree.nodes(data=True)}
    assert heights == pytest.approx({(2, 2): 2 / 3, (1, 0): 0.0, (1, 3): 0.0, (0, 4): 0.0, (0, 1): -1 / 3})


def test_release_tree_needs_two_layers_and_may_be_empty():
    with pytest.raises(AttAttrError, match="2 layers"):
        release_tree(np.ones((1, 3, 3)), ["[CLS]", "x", "y"])
    assert release_tree(-np.ones((2, 3, 3)), ["[CLS]", "x", "y"]).number_of_nodes() == 0


# -- receptive field ----------------------------------------------------------------------------------------
def test_receptive_field_counts_distances_per_layer():
    a = np.zeros((2, 5, 5))
    a[1, 0, 3] = 1.0  # layer 1 (0-based), distance 3
    a[1, 0, 1] = 0.5  # distance 1
    a[0, 3, 4] = 1.0  # layer 0, distance 1
    tokens = ["[CLS]", "a", "b", "c", "d"]
    first = attribution_graph(a, tokens)
    b = np.zeros((2, 5, 5))
    b[1, 0, 4] = 1.0  # distance 4
    b[0, 4, 2] = 1.0  # distance 2
    field = receptive_field([first, attribution_graph(b, tokens)])
    assert field.distances == [[1, 2], [1, 3, 4]]
    assert field.mean() == [1.5, pytest.approx(8 / 3)]
    data = field.to_json()
    assert data["n_graphs"] == 2 and data["layers"][1]["histogram"] == {"1": 1, "3": 1, "4": 1}
    with pytest.raises(AttAttrError):
        receptive_field([first, attribution_graph(np.zeros((3, 5, 5)), tokens)])


# -- drawing ------------------------------------------------------------------------------------------------
def test_graph_figure_draws_every_edge_and_png_grows_with_tokens():
    from PIL import Image

    from attattr_fast.graph_draw import graph_figure, render_graph

    rng = np.random.default_rng(1)
    sizes = {}
    for n in (8, 60):
        tokens = ["[CLS]"] + [f"w{i}" for i in range(1, n - 1)] + ["[SEP]"]
        sparse = rng.normal(size=(6, n, n)) * (rng.random((6, n, n)) < 0.05)  # about as sparse as real graphs
        graph = attribution_graph(sparse, tokens)
        fig = graph_figure(graph, title="t")
        ax = fig.axes[0]
        residual_lines, attention_lines = (len(c.get_segments()) for c in ax.collections[:2])
        assert attention_lines == len(attention_edges(graph))
        assert residual_lines == sum(d["kind"] == "residual" for *_, d in graph.edges(data=True))
        assert len(ax.collections[2].get_offsets()) == graph.number_of_nodes()
        png = render_graph(graph, "png")
        sizes[n] = Image.open(io.BytesIO(png)).size
        svg = render_graph(graph, "svg").decode()
        assert all(f">{graph.nodes[v]['token']}<" in svg for v in graph)  # labels stay text
    assert sizes[60][0] >= 60 * 30  # about 30 px or more per token column
    assert sizes[60][0] > sizes[8][0]


def test_html_is_self_contained_and_heatmaps_keep_orientation():
    from PIL import Image

    from attattr_fast.graph_draw import graph_html

    n_layers, heads, n = 2, 3, 5
    tokens = ["[CLS]", "a<b", "c", "d", "[SEP]"]
    rng = np.random.default_rng(2)
    attention = torch.softmax(torch.tensor(rng.normal(size=(n_layers, heads, n, n))), -1).float()
    attributions = torch.tensor(rng.normal(size=(n_layers, heads, n, n))).float()
    attention[1, 0] = 0.0
    attention[1, 0, 3, 1] = 1.0  # the only non-zero entry: row 3 (query d), column 1 (key a<b)
    layer_attr = attributions.sum(1)
    graph = attribution_graph(layer_attr, tokens)
    page = graph_html(graph, layer_attr, attention, attributions, title="T", details=["p"])
    assert not re.search(r"(src|href)=[\"']?(https?:|//)", page) and "<link" not in page and "<script" not in page
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(uris) == n_layers * (1 + 2 * heads)
    assert "a&lt;b" in page and "<svg" in page
    # layers are listed top first: layer 2's sum, then head 1 attention
    pixels = np.asarray(Image.open(io.BytesIO(__import__("base64").b64decode(uris[1]))).convert("RGB"))
    assert pixels.shape[:2] == (n, n)
    dark = np.argwhere(pixels.sum(-1) == pixels.sum(-1).min())
    assert dark.tolist() == [[3, 1]]
    reduced = graph_html(graph, layer_attr)
    assert "not available" in reduced and len(re.findall("data:image/png", reduced)) == n_layers


def test_receptive_field_figure_renders():
    from attattr_fast.graph import ReceptiveField
    from attattr_fast.graph_draw import receptive_field_figure, render_figure

    png = render_figure(receptive_field_figure(ReceptiveField([[1, 2], [], [3, 3, 5]], 2)), "png")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


# -- faithfulness -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["bert", "roberta", "electra"])
def test_unedited_forward_matches_transformers(family):
    model = tiny_classifier(family)
    ids, mask, types = padded_batch(model, [7, 5], pair_at=3)
    expected = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    got = forward_with_attention_edits(model, ids, mask, types, keep={})
    torch.testing.assert_close(got, expected, atol=ADAPTER_ATOL, rtol=0)


def _transformers_with_keep(model, keep):
    """The transformers model itself, with its attention probabilities multiplied by `keep` (an
    attention function registered with transformers, independent of the adapter)."""
    from transformers import AttentionInterface
    from transformers.models.bert.modeling_bert import eager_attention_forward

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        scores = torch.matmul(query, key.transpose(2, 3)) * scaling
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = torch.softmax(scores, dim=-1)
        if module.layer_idx in keep:
            probs = probs * keep[module.layer_idx].unsqueeze(1)
        return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs

    assert eager_attention_forward is not attention
    AttentionInterface.register("attattr_test_keep", attention)
    model.set_attn_implementation("attattr_test_keep")
    return model


def _sensitive(model):
    """A random BERT's attention output is tiny next to the residual; larger value and output projections
    (and head) make removing attention entries move the logits well above the float32 noise."""
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            layer.attention.self.value.weight.mul_(10.0)
            layer.attention.output.dense.weight.mul_(10.0)
        model.classifier.weight.mul_(20.0)
    return model


def test_edited_forward_matches_transformers_with_zeroed_probabilities():
    model = _sensitive(tiny_classifier("bert", layers=3))
    ids, mask, types = padded_batch(model, [6, 6], seed=4)
    g = torch.Generator().manual_seed(0)
    keep = {0: (torch.rand(2, 6, 6, generator=g) > 0.3).float(), 2: (torch.rand(2, 6, 6, generator=g) > 0.5).float()}
    ours = forward_with_attention_edits(model, ids, mask, types, keep)
    plain = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    theirs = _transformers_with_keep(model, keep)(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    torch.testing.assert_close(ours, theirs, atol=ADAPTER_ATOL, rtol=0)
    assert (ours - plain).abs().max() > 1000 * ADAPTER_ATOL  # the edits change the output


def test_graph_faithfulness_zeroes_the_graph_edges_and_draws_matched_controls(monkeypatch):
    import attattr_fast.graph as graph_module

    model = _sensitive(tiny_classifier("bert", layers=2, num_labels=3))
    ids, _, types = padded_batch(model, [6], seed=5)
    a = np.zeros((2, 6, 6))
    a[1, 0, 2] = 1.0  # encoder layer 1: (i=0, j=2)
    a[1, 0, 5] = 0.8  # encoder layer 1: (0, 5)
    a[0, 2, 3] = 1.0  # encoder layer 0: (2, 3)
    graph = attribution_graph(a, ["[CLS]", "a", "b", "c", "d", "e"], sep_token=None)
    assert attention_edges(graph) == [(0, 2, 3, 1.0), (1, 0, 2, 1.0), (1, 0, 5, 0.8)]

    seen = {}
    original = graph_module.forward_with_attention_edits

    def spy(model_, ids_, mask_, types_, keep):
        seen.update(keep)
        return original(model_, ids_, mask_, types_, keep)

    monkeypatch.setattr(graph_module, "forward_with_attention_edits", spy)
    result = graph_faithfulness(model, graph, ids, token_type_ids=types, target=1, draws=7, seed=3)
    assert result.n_edges == 3 and result.edges_per_layer == [1, 2] and result.draws == 7
    removed = {layer: (1 - mask).sum(dim=(1, 2)).tolist() for layer, mask in seen.items()}
    assert removed == {0: [0, 1] + [1] * 7, 1: [0, 2] + [2] * 7}  # row 0 real, row 1 graph, then the draws
    assert all(float(seen[layer][r].diagonal().min()) == 1.0 for layer in seen for r in range(9))

    keep = {0: torch.ones(1, 6, 6), 1: torch.ones(1, 6, 6)}
    keep[0][0, 2, 3] = keep[1][0, 0, 2] = keep[1][0, 0, 5] = 0.0
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=ids, token_type_ids=types).logits, -1)[0, 1]
        edited = _transformers_with_keep(model, keep)(input_ids=ids, token_type_ids=types).logits
    assert result.prob == pytest.approx(float(probs), abs=1e-6)
    assert result.graph_prob == pytest.approx(float(torch.softmax(edited, -1)[0, 1]), abs=1e-6)
    assert result.graph_drop == pytest.approx(result.prob - result.graph_prob)
    again = graph_faithfulness(model, graph, ids, token_type_ids=types, target=1, draws=7, seed=3)
    assert again == result
    # in the last layer of a graph into [CLS] the control draws from [CLS]'s row only: elsewhere an entry
    # cannot change a [CLS] head's output
    last = seen[1][2:]
    assert float(last[:, 1:].min()) == 1.0 and float(last[:, 0].min()) == 0.0
    seen.clear()
    graph_faithfulness(model, attribution_graph(a, graph.graph["tokens"], readout="all", sep_token=None), ids,
                       token_type_ids=types, draws=30, seed=3)  # fmt: skip
    assert float(seen[1][2:, 1:].min()) == 0.0  # a pooling head's: every row


def test_graph_faithfulness_checks_its_input():
    model = tiny_classifier("bert", layers=2)
    ids, mask, _ = padded_batch(model, [6, 4])
    graph = attribution_graph(np.zeros((2, 4, 4)), ["[CLS]", "a", "b", "c"])
    with pytest.raises(AttAttrError, match="one example"):
        graph_faithfulness(model, graph, ids)
    result = graph_faithfulness(model, graph, ids[1], attention_mask=mask[1])  # padding cut off: 4 tokens
    assert result.n_edges == 0 and result.graph_drop == 0.0 and result.random_drop == 0.0
    with pytest.raises(AttAttrError, match="tokens"):
        graph_faithfulness(model, graph, ids[0])
    one = ids[1, :4]
    for kwargs, message in [
        (dict(draws=1.5), "draws must be an integer"),
        (dict(target=1.7), "target must be None or a class index"),
        (dict(input_ids=one.float()), "input_ids must be a LongTensor"),
        (dict(input_ids=one + 10**6), "outside the model's vocabulary"),
        (dict(input_ids=one[None, None]), "LongTensor of shape"),
        (dict(graph=attribution_graph(np.zeros((3, 4, 4)), ["[CLS]", "a", "b", "c"])), "3-layer model"),
    ]:  # fmt: skip
        args = {"model": model, "graph": graph, "input_ids": one, **kwargs}
        with pytest.raises(AttAttrError, match=message):
            graph_faithfulness(**args)


def test_builtin_minilm_unedited_forward_matches_its_logits(builtin):
    from attattr_fast.text import encode

    model, tokenizer = builtin
    enc = encode(tokenizer, ["A charming film.", "Dull and far too long, I nearly left."])
    expected = model(enc.input_ids, enc.attention_mask, enc.token_type_ids).logits
    got = forward_with_attention_edits(model, enc.input_ids, enc.attention_mask, enc.token_type_ids)
    torch.testing.assert_close(got, expected, atol=ADAPTER_ATOL, rtol=0)


# -- CLI ----------------------------------------------------------------------------------------------------
def _results_dir(path, layer_attr, tokens, layers=None, attention=None, attributions=None, model_layers=None,
                 sep_token="[SEP]"):
    from attattr_fast.results import Record, ResultsWriter

    n_layers = layer_attr.shape[0]
    model = {"name": "test", "n_layers": model_layers or n_layers, "sep_token": sep_token}
    writer = ResultsWriter(path, {"model": model, "layers": layers or list(range(n_layers)), "output": "full"})
    for index in range(2):
        writer.add(Record(
            index=index, tokens=tokens, text="hand made", text_pair=None, label=None, target=1,
            target_label="positive", prob=0.75, layers=layers or list(range(n_layers)),
            head_max=torch.zeros(n_layers, 2), head_argmax=torch.zeros(n_layers, 2, 2, dtype=torch.long),
            layer_attr=torch.tensor(layer_attr, dtype=torch.float32) * (index + 1), delta=torch.zeros(n_layers),
            attributions=None if attributions is None else attributions.clone(),
            attention=None if attention is None else attention.clone(),
        ))  # fmt: skip
    writer.close()
    return path


@pytest.fixture
def hand_results(tmp_path):
    a = np.zeros((2, 4, 4))
    a[1, 0, 1], a[1, 1, 0], a[1, 0, 2], a[1, 2, 3], a[1, 3, 3] = 0.9, 0.5, 0.3, 0.2, 1.0
    a[0, 1, 3], a[0, 2, 3], a[0, 2, 1], a[0, 1, 2], a[0, 3, 0] = 1.0, 0.8, 0.6, 0.5, 0.39
    heads = torch.rand(2, 3, 4, 4)
    return _results_dir(tmp_path / "res", a, ["[CLS]", "a", "b", "c"], attention=heads, attributions=heads - 0.5)


def cli(*argv):
    from attattr_fast.cli import main

    return main(["graph", *map(str, argv)])


def test_cli_json_from_results_matches_the_hand_worked_graph(hand_results, tmp_path, capsys):
    out = tmp_path / "g.json"
    # the hand-made last layer has entries outside [CLS]'s row, which on its own would make the readout "all"
    assert cli("--results", hand_results, "--index", 1, "--readout", "first", "--out", out) == 0
    data = json.loads(out.read_text())
    graph = graph_from_json(data)
    assert {(u, v): d["kind"] for u, v, d in graph.edges(data=True)} == {
        ((1, 1), (2, 0)): "attention", ((1, 2), (2, 0)): "attention", ((0, 3), (1, 1)): "attention",
        ((0, 1), (1, 2)): "attention", ((0, 1), (1, 1)): "residual",
    }  # fmt: skip
    assert graph.edges[(0, 1), (1, 2)]["weight"] == pytest.approx(1.2)  # example 1 holds twice the matrices
    assert data["graph"]["index"] == 1 and data["graph"]["target_label"] == "positive"
    printed = capsys.readouterr().out
    assert "4 attention edges" in printed and "a@1 → [CLS]@0" in printed
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_cli_reads_results_whose_layers_are_stored_in_any_order(tmp_path, capsys):
    # `attribute --layers 1,0` stores layer 1's scores first; the graph walks the layers by number all the same
    a = np.zeros((2, 4, 4))
    a[1, 0, 1], a[1, 0, 2], a[0, 1, 3], a[0, 2, 1] = 0.9, 0.3, 1.0, 0.6
    heads = torch.rand(2, 3, 4, 4)
    tokens = ["[CLS]", "a", "b", "c"]
    ordered = _results_dir(tmp_path / "ordered", a, tokens, attention=heads, attributions=heads - 0.5)
    flipped = _results_dir(tmp_path / "flipped", a[::-1].copy(), tokens, layers=[1, 0],
                           attention=heads.flip(0), attributions=heads.flip(0) - 0.5)  # fmt: skip
    for option, name in (([], "g.json"), (["--receptive-field"], "rf.json"), (["--format", "html"], "g.html")):
        written = []
        for results in (ordered, flipped):
            out = tmp_path / f"{results.name}-{name}"
            assert cli("--results", results, "--readout", "first", *option, "--out", out) == 0, capsys.readouterr()
            written.append(out.read_text().replace(str(results), "SOURCE"))
        assert written[0] == written[1], option
    assert "4 attention edges" in capsys.readouterr().out


@pytest.mark.parametrize("fmt, magic", [("png", b"\x89PNG"), ("svg", b"<?xml"), ("html", b"<!DOCTYPE html>")])
def test_cli_images_and_html(hand_results, tmp_path, fmt, magic):
    out = tmp_path / f"g.{fmt}"
    assert cli("--results", hand_results, "--format", fmt, "--out", out, "--method", "release", "--tau", "0.3") == 0
    assert out.read_bytes().startswith(magic)


def test_cli_receptive_field(hand_results, tmp_path, capsys):
    out = tmp_path / "rf.json"
    assert cli("--results", hand_results, "--receptive-field", "--readout", "first", "--out", out) == 0
    data = json.loads(out.read_text())
    # both examples give the hand-worked graph: layer 0 edges (1←3), (2←1); layer 1 edges (0←1), (0←2)
    assert [layer["histogram"] for layer in data["layers"]] == [{"1": 2, "2": 2}, {"1": 2, "2": 2}]
    assert [layer["layer"] for layer in data["layers"]] == [0, 1]
    assert data["readout"] == "first" and data["tau_last"] == [0.0]  # given, and the value it implied
    assert cli("--results", hand_results, "--receptive-field", "--out", out) == 0
    data = json.loads(out.read_text())
    assert data["readout"] == ["all"] and data["tau_last"] == [0.4]  # read off the scores of every example
    assert cli("--results", hand_results, "--receptive-field", "--out", tmp_path / "rf.png") == 0
    printed = capsys.readouterr().out  # the layers as the JSON and `attribute` number them
    assert printed.startswith("layer  0:    4 edges") and "layer  1:    4 edges" in printed, printed


def _fails(capsys, *argv, out=None, match=""):
    assert cli(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("attattr-fast: error:") and match in err, err
    if out is not None:
        assert not out.exists()


@pytest.mark.parametrize("index, match", [("2", "res (finished examples: 0..1)"),
                                          ("-1", "non-negative"), ("x", "integer")])  # fmt: skip
def test_cli_bad_index(hand_results, tmp_path, capsys, index, match):
    _fails(capsys, "--results", hand_results, "--index", index, "--out", tmp_path / "g.png", out=tmp_path / "g.png",
           match=match)


@pytest.mark.parametrize("option, value", [("--target", "negative"), ("--steps", "5"), ("--model", "elsewhere"),
                                           ("--quadrature", "gausslegendre"), ("--text-pair", "b")])
def test_cli_text_options_do_not_go_with_results(hand_results, tmp_path, capsys, option, value):
    _fails(capsys, "--results", hand_results, option, value, "--out", tmp_path / "g.png", out=tmp_path / "g.png",
           match=f"{option} goes with --text")


@pytest.mark.parametrize("tau", ["1.5", "abc", "nan", "-0.1", "1"])
def test_cli_bad_tau(hand_results, tmp_path, capsys, tau):
    _fails(capsys, "--results", hand_results, "--tau", tau, "--out", tmp_path / "g.png", out=tmp_path / "g.png",
           match="--tau")


def test_cli_missing_and_corrupt_results(tmp_path, capsys, hand_results):
    out = tmp_path / "g.png"
    _fails(capsys, "--results", tmp_path / "nowhere", "--out", out, out=out, match="not found")
    (tmp_path / "empty").mkdir()
    _fails(capsys, "--results", tmp_path / "empty", "--out", out, out=out, match="manifest")
    (hand_results / "manifest.json").write_text("{not json")
    _fails(capsys, "--results", hand_results, "--out", out, out=out, match="corrupt")


def test_cli_damaged_shard(hand_results, tmp_path, capsys):
    out = tmp_path / "g.png"
    shard = next(hand_results.glob("*.safetensors"))
    shard.write_bytes(b"garbage")
    _fails(capsys, "--results", hand_results, "--out", out, out=out, match="shard")


def test_cli_other_mistakes(hand_results, tmp_path, capsys):
    out = tmp_path / "g.png"
    _fails(capsys, "--results", hand_results, "--method", "nope", "--out", out, out=out, match="--method")
    _fails(capsys, "--results", hand_results, "--format", "pdf", "--out", out, out=out, match="--format")
    _fails(capsys, "--results", hand_results, "--out", tmp_path / "no" / "g.png", match="does not exist")
    _fails(capsys, "--results", hand_results, "--format", "svg", "--out", out, out=out, match="does not match")
    bmp = tmp_path / "g.bmp"
    _fails(capsys, "--results", hand_results, "--out", bmp, out=bmp, match="'.bmp' is not one of")
    _fails(capsys, "--results", hand_results, "--receptive-field", "--format", "html", match="--format")
    _fails(capsys, "--text", "fine", "--receptive-field", match="needs --results")
    _fails(capsys, "--results", hand_results, "--readout", "cls", "--out", out, out=out, match="--readout")
    _fails(capsys, "--results", hand_results, "--method", "release", "--readout", "all", "--out", out, out=out,
           match="--readout goes with")  # fmt: skip
    _fails(capsys, "--results", hand_results, "--method", "release", "--tau-last", "0.5", "--out", out, out=out,
           match="--tau-last goes with")  # fmt: skip
    partial = _results_dir(tmp_path / "partial", np.zeros((2, 3, 3)), ["[CLS]", "x", "[SEP]"], layers=[0, 2])
    _fails(capsys, "--results", partial, "--out", out, out=out, match="all 2 layers")
    # the lower layers of a deeper model: every layer present, but the top one is not the model's last
    lower = _results_dir(tmp_path / "lower", np.zeros((2, 3, 3)), ["[CLS]", "x", "[SEP]"], model_layers=6)
    _fails(capsys, "--results", lower, "--out", out, out=out, match="all 6 layers of the model")
    _fails(capsys, "--results", lower, "--receptive-field", "--out", tmp_path / "f.json", match="all 6 layers")
    unknown = _results_dir(tmp_path / "unknown", np.zeros((2, 3, 3)), ["[CLS]", "x", "[SEP]"], sep_token=None)
    _fails(capsys, "--results", unknown, "--out", out, out=out, match="does not record")
    negative = _results_dir(tmp_path / "negative", np.zeros((2, 3, 3)), ["[CLS]", "x", "[SEP]"], model_layers=-3)
    _fails(capsys, "--results", negative, "--out", out, out=out, match="does not record")
    _fails(capsys, "--results", hand_results, "--device", "cpu", "--out", out, out=out, match="--device goes with")


def test_graphs_from_result_needs_every_layer_of_the_model():
    model = tiny_classifier("bert", layers=3)
    ids, mask, types = padded_batch(model, [5, 4])
    aa = AttentionAttribution(model)
    whole = aa.attribute(ids, mask, types, n_steps=2, output="reduced")
    tokens = [["[CLS]", "a", "b", "c", "[SEP]"], ["[CLS]", "a", "b", "[SEP]"]]
    graphs = graphs_from_result(whole, tokens)
    assert [set(g.edges) for g in graphs] == [
        set(attribution_graph(whole.layer_attr[b, :, :n, :n], tokens[b]).edges) for b, n in enumerate((5, 4))]
    flipped = aa.attribute(ids, mask, types, n_steps=2, output="reduced", layers=[2, 0, 1])
    assert [set(g.edges) for g in graphs_from_result(flipped, tokens)] == [set(g.edges) for g in graphs]
    lower = aa.attribute(ids, mask, types, n_steps=2, output="reduced", layers=[0, 1])
    with pytest.raises(AttAttrError, match="all 3 layers of the model"):
        graphs_from_result(lower, tokens)


def test_cli_uses_the_tokenizers_separator(tmp_path, capsys):
    # RoBERTa's separator is </s>: its leaves go, as [SEP]'s do for BERT
    a = np.zeros((2, 3, 3))
    a[1, 0, 2] = 1.0  # the last layer reads the separator into position 0; nothing reaches the separator
    out = tmp_path / "g.json"
    for sep, tokens, edges in (("</s>", ["<s>", "a", "</s>"], 0), ("[SEP]", ["<s>", "a", "</s>"], 1)):
        results = _results_dir(tmp_path / sep.strip("<>/[]"), a, tokens, sep_token=sep)
        assert cli("--results", results, "--out", out) == 0
        assert f"{edges} attention edges" in capsys.readouterr().out


def test_dollar_signs_in_text_are_drawn_as_text():
    from attattr_fast.graph_draw import render_graph

    tokens = ["[CLS]", "$", "5", "^", "^", "$6", "[SEP]"]
    a = np.zeros((2, 7, 7))
    a[1, 0, 1], a[1, 0, 5] = 1.0, 0.8
    graph = attribution_graph(a, tokens)
    svg = render_graph(graph, "svg", title="The $5^^ price and $6 deal").decode()  # mathtext would raise here
    assert "The $5^^ price and $6 deal" in svg and ">$6<" in svg
    assert render_graph(graph, "png", title="cost $5 and $10").startswith(b"\x89PNG")


def test_cli_text_matches_the_api(tmp_path, builtin):
    from attattr_fast.api import AttentionAttribution
    from attattr_fast.text import encode

    text, pair = "A charming, funny film.", "I liked it."
    out = tmp_path / "g.json"
    assert cli("--text", text, "--text-pair", pair, "--steps", 2, "--tau", 0.3, "--out", out) == 0
    data = json.loads(out.read_text())
    model, tokenizer = builtin
    enc = encode(tokenizer, [text], [pair])
    res = AttentionAttribution(model).attribute(enc.input_ids, enc.attention_mask, enc.token_type_ids, n_steps=2)
    expected = attribution_graph(res.layer_attr[0], enc.tokens[0], tau=0.3)
    got = graph_from_json(data)
    assert data["graph"]["tokens"] == enc.tokens[0] and data["graph"]["prob"] == pytest.approx(float(res.prob[0]))
    assert set(got.edges) == set(expected.edges)


def test_finished_examples_are_named_as_runs():
    from attattr_fast.cli.graph import _ranges

    assert _ranges([5, 0, 1, 2, 7, 8]) == "0..2, 5, 7..8"
    assert _ranges(list(range(0, 40, 2)), most=3) == "0, 2, 4, … (17 more runs)"
