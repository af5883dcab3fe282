"""`attattr-fast graph`: the attribution graph of one example as PNG, SVG, HTML or JSON; receptive fields."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from attattr_fast.cli import common
from attattr_fast.errors import AttAttrError

FORMATS = ("png", "svg", "html", "json")
FIELD_FORMATS = ("png", "svg", "json")


def register(sub) -> None:
    p = sub.add_parser(
        "graph", help="draw the attribution graph of an example (PNG, SVG, HTML with heatmaps, JSON)",
        description="The attribution graph (the paper's Algorithm 1) of one example from a results directory "
                    "or of a text attributed on the spot; or the receptive field of every example of a results "
                    "directory.")  # fmt: skip
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--results", help="results directory written by `attattr-fast attribute` (all layers)")
    source.add_argument("--text", help="a text to attribute now and draw")
    p.add_argument("--text-pair", help="second segment for --text (sentence pairs)")
    p.add_argument("--index", default=None,
                   help="example of --results: its 0-based input position, as `attribute` prints it (default 0)")
    p.add_argument("--receptive-field", action="store_true",
                   help="with --results: distances |i-j| of the graph edges of every example, per layer")
    p.add_argument("--method", default="algorithm1", help="algorithm1 (default) or release (the authors' script)")
    p.add_argument("--tau", default="0.4", help="edge threshold, share of the layer's maximum, in [0, 1) (default 0.4)")
    p.add_argument("--tau-last", default=None,
                   help="threshold for the last layer, algorithm1 only (default: 0.0, every edge into [CLS], for a "
                        "model that reads [CLS]; --tau for one that pools every token, as the built-in model)")
    p.add_argument("--readout", default="auto",
                   help="what the model's head reads after the last layer, algorithm1 only: first ([CLS]), all "
                        "(every token, a pooling head) or auto (default: from the scores, exactly, since a head "
                        "that reads [CLS] leaves the last layer's other rows zero)")
    p.add_argument("--format", default=None, help="png, svg, html or json (default: from --out, else png)")
    p.add_argument("--out", default=None, help="file to write (default graph-<index>.<format> / graph.<format>)")
    common.add_model_options(p)
    p.add_argument("--steps", default=None, help="with --text: quadrature steps (default 20)")
    p.add_argument("--quadrature", default=None, help="with --text: quadrature rule (default riemann_right)")
    p.add_argument("--target", default=None, help="with --text: predicted (default) or a label name")
    p.set_defaults(func=run, reads=("results",), writes=("out",))


def _output(args, default_stem: str, allowed: tuple[str, ...]) -> tuple[Path, str]:
    fmt = args.format.lower() if args.format is not None else None
    suffix = Path(args.out).suffix.lstrip(".").lower() if args.out else ""
    if fmt is None and suffix and suffix not in allowed:
        raise AttAttrError(f"--out {args.out}: '.{suffix}' is not one of {', '.join(allowed)} here; "
                           "name the file so, or pass --format")
    if fmt is None:
        fmt = suffix or "png"
    if fmt not in allowed:
        raise AttAttrError(f"--format: {args.format!r} is not one of {', '.join(allowed)} here")
    if suffix in FORMATS and suffix != fmt:
        raise AttAttrError(f"--out {args.out} does not match --format {fmt}")
    return common.check_output_path(args.out or f"{default_stem}.{fmt}", "--out"), fmt


def _options(args) -> dict:
    from attattr_fast.graph import METHODS, READOUTS, check_tau

    if args.method not in METHODS:
        raise AttAttrError(f"--method: unknown graph method {args.method!r}; choose one of {', '.join(METHODS)}")
    if args.readout not in ("auto", *READOUTS):
        raise AttAttrError(f"--readout: {args.readout!r} is not one of auto, {', '.join(READOUTS)}")
    options = {"method": args.method, "tau": check_tau(args.tau, "--tau")}
    options["tau_last"] = None if args.tau_last is None else check_tau(args.tau_last, "--tau-last")
    if args.method == "algorithm1":
        options["readout"] = None if args.readout == "auto" else args.readout
    else:
        given = "--readout" if args.readout != "auto" else "--tau-last" if args.tau_last is not None else None
        if given:
            raise AttAttrError(f"{given} goes with --method algorithm1; the release tree starts at its own root")
    return options


def run(args: argparse.Namespace) -> int:
    if args.text is None:  # the results directory fixes the model, the target and the quadrature
        given = [name for name, value in (("--text-pair", args.text_pair), ("--model", args.model),
                                          ("--steps", args.steps), ("--quadrature", args.quadrature),
                                          ("--target", args.target), ("--device", args.device))
                 if value is not None]  # fmt: skip
        if given:
            raise AttAttrError(f"{given[0]} goes with --text; --results draws what the results directory holds")
    options = _options(args)
    if args.receptive_field:
        if args.index is not None:
            raise AttAttrError("--receptive-field uses every example; it does not go with --index")
        if args.results is None:
            raise AttAttrError("--receptive-field needs --results")
        return _receptive_field(args, options)
    if args.results is not None:
        index = _parse_index(args.index)
        out, fmt = _output(args, f"graph-{index}", FORMATS)  # checked before any slow work
        example = _from_results(args, index)
    else:
        if args.index is not None:
            raise AttAttrError("--index selects an example of --results; it does not go with --text")
        out, fmt = _output(args, "graph", FORMATS)
        example = _from_text(args, per_head=fmt == "html")
    return _write_graph(example, options, out, fmt)


def _parse_index(value: str | None) -> int:
    try:
        index = int(value if value is not None else 0)
    except ValueError:
        raise AttAttrError(f"--index must be a non-negative integer, got {value!r}") from None
    if index < 0:
        raise AttAttrError(f"--index must be a non-negative integer, got {value!r}")
    return index


def _load_records(directory: str):
    from attattr_fast.results import load_results

    results = load_results(directory)
    if len(results) == 0:
        raise AttAttrError(f"{directory} holds no finished examples (an interrupted run resumes with the same "
                           "`attattr-fast attribute` command)")
    return results


def _ranges(indices: list[int], most: int = 6) -> str:
    """Sorted input positions as runs, "0..11, 16, 20..47", the first `most` of them."""
    runs: list[list[int]] = []
    for i in sorted(indices):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    shown = [f"{a}..{b}" if b > a else str(a) for a, b in runs[:most]]
    return ", ".join(shown) + (f", … ({len(runs) - most} more runs)" if len(runs) > most else "")


def _model_facts(results, directory: str) -> tuple[int, str]:
    """(encoder layers, separator token) of the model that wrote `results`, from its manifest."""
    model = results.manifest.get("model")
    layers = model.get("n_layers") if isinstance(model, dict) else None
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1 or not model.get("sep_token"):
        raise AttAttrError(f"{directory}: the manifest does not record the model's layer count and separator "
                           "token (written by an older attattr-fast); attribute again to draw graphs")
    return model["n_layers"], model["sep_token"]


def _from_results(args, index: int) -> dict:
    from attattr_fast.graph import layer_order

    results = _load_records(args.results)
    try:
        model_layers, sep_token = _model_facts(results, args.results)
        # --index is the example's input position, as `attribute` prints it; an unfinished run may lack some
        indices = list(results.indices)
        if index not in indices:
            raise AttAttrError(f"--index {index}: no such example in {args.results} (finished examples: "
                               f"{_ranges(indices)})")
        record = results[indices.index(index)]
    finally:
        results.close()
    if record.layer_attr is None:
        raise AttAttrError(f"example {index} of {args.results} has no layer matrices")
    order = layer_order(record.layers, model_layers)

    def by_layer(scores):  # [L, …] in layer order
        return None if scores is None else scores[order]

    return {"index": index, "sep_token": sep_token,
            "tokens": record.tokens, "text": record.text, "text_pair": record.text_pair,
            "target": record.target, "target_label": record.target_label, "prob": record.prob,
            "layer_attr": by_layer(record.layer_attr), "attention": by_layer(record.attention),
            "attributions": by_layer(record.attributions),
            "source": str(args.results)}  # fmt: skip


def _from_text(args, per_head: bool) -> dict:
    from attattr_fast.api import AttentionAttribution
    from attattr_fast.datasets import label_index
    from attattr_fast.quadrature import METHODS as QUADRATURE
    from attattr_fast.text import encode, model_max_length

    if not args.text.strip():
        raise AttAttrError("--text is empty")
    steps = common.parse_steps(args.steps or "20")
    quadrature = args.quadrature or "riemann_right"
    if quadrature not in QUADRATURE:
        raise AttAttrError(f"--quadrature: unknown rule {quadrature!r}; choose one of {', '.join(QUADRATURE)}")
    device = common.parse_device(args.device)
    model, tokenizer = common.load_model(args.model, device)
    aa = AttentionAttribution(model)
    config = aa.adapter.config
    target = None
    if args.target not in (None, "predicted"):
        target = label_index(args.target, dict(getattr(config, "label2id", {}) or {}), aa.adapter.num_labels)
    max_length = model_max_length(tokenizer, aa.adapter.max_length)
    enc = encode(tokenizer, [args.text], [args.text_pair], max_length=max_length)
    res = aa.attribute(enc.input_ids, enc.attention_mask, enc.token_type_ids, target=target, n_steps=steps,
                       method=quadrature, output="full" if per_head else "reduced")  # fmt: skip
    t = int(res.target[0])
    return {"index": 0, "sep_token": tokenizer.sep_token,
            "tokens": enc.tokens[0], "text": args.text, "text_pair": args.text_pair, "target": t,
            "target_label": (getattr(config, "id2label", None) or {}).get(t, str(t)), "prob": float(res.prob[0]),
            "layer_attr": res.layer_attr[0], "source": "--text",
            "attention": None if res.attention is None else res.attention[0],
            "attributions": None if res.attributions is None else res.attributions[0]}  # fmt: skip


def _title(example: dict) -> str:
    text = example["text"] or " ".join(example["tokens"])
    if example.get("text_pair"):
        text = f"{text} ‖ {example['text_pair']}"
    if len(text) > 400:
        text = text[:399] + "…"
    return text


def _write_graph(example: dict, options: dict, out: Path, fmt: str) -> int:
    from attattr_fast import graph_draw
    from attattr_fast.graph import attention_edges, build_graph, graph_to_json

    graph = build_graph(example["layer_attr"], example["tokens"], **options, sep_token=example["sep_token"])
    prediction = f"target {example['target_label']} (class {example['target']}), p = {example['prob']:.3f}"
    if fmt == "json":
        data = graph_to_json(graph, text=example["text"], text_pair=example["text_pair"], target=example["target"],
                             target_label=example["target_label"], prob=example["prob"], source=example["source"],
                             index=example["index"])  # fmt: skip
        payload = (json.dumps(data, ensure_ascii=False, indent=1) + "\n").encode("utf-8")
    elif fmt == "html":
        if example["attention"] is None or example["attributions"] is None:
            print("attattr-fast: note: no per-head scores in these results (output=reduced); the page shows "
                  "layer sums only", file=sys.stderr)  # fmt: skip
        page = graph_draw.graph_html(graph, example["layer_attr"], example["attention"], example["attributions"],
                                     title=_title(example), details=[prediction])  # fmt: skip
        payload = page.encode("utf-8")
    else:
        payload = graph_draw.render_graph(graph, fmt, title=f"{_title(example)}\n{prediction}")
    graph_draw.write_atomic(out, payload)

    tokens = graph.graph["tokens"]
    edges = attention_edges(graph)
    print(f"[{example['index']}] {prediction}: {graph.number_of_nodes()} nodes, {len(edges)} attention edges")
    for layer, i, j, weight in sorted(edges, key=lambda e: (-e[0], -e[3])):
        print(f"  layer {layer:>2}: {tokens[j]}@{j} → {tokens[i]}@{i}  {weight:+.4g}")
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _receptive_field(args, options: dict) -> int:
    from attattr_fast import graph_draw
    from attattr_fast.graph import build_graph, layer_order, receptive_field

    out, fmt = _output(args, "receptive_field", FIELD_FORMATS)
    graphs = []
    results = _load_records(args.results)
    try:
        model_layers, sep_token = _model_facts(results, args.results)
        for record in results:
            if record.layer_attr is None:
                raise AttAttrError(f"example {record.index} of {args.results} has no layer matrices")
            order = layer_order(record.layers, model_layers)
            graphs.append(build_graph(record.layer_attr[order], record.tokens, **options, sep_token=sep_token))
    finally:
        results.close()
    field = receptive_field(graphs)
    if fmt == "json":
        used = {key: sorted({g.graph[key] for g in graphs if key in g.graph}) for key in ("readout", "tau_last")}
        settings = {**options, **{key: values for key, values in used.items() if options.get(key) is None and values}}
        payload = (json.dumps({**field.to_json(), **settings, "source": str(args.results)}, indent=1) + "\n").encode()
    else:
        payload = graph_draw.render_figure(graph_draw.receptive_field_figure(field), fmt)
    graph_draw.write_atomic(out, payload)
    for layer, (mean, distances) in enumerate(zip(field.mean(), field.distances)):
        shown = "-" if mean is None else f"{mean:.2f}"
        print(f"layer {layer:>2}: {len(distances):>4} edges, mean |i-j| {shown}")
    print(f"wrote {out}", file=sys.stderr)
    return 0
