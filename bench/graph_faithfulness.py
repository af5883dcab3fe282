"""Faithfulness of attribution graphs on the built-in MiniLM sentiment model (issue 5, item 5).

For each sentence: attribute every layer (predicted class), build the graph, then set the attention
entries of the graph's edges to zero in their layers (every head) and measure the drop of the target
probability; against it, the mean drop from as many random off-diagonal entries per layer, over
`--draws` draws (`attattr_fast.graph.graph_faithfulness`). Both graph rules are measured: Algorithm 1
and the released script's tree. The built-in model's head pools every token, so Algorithm 1's graphs end in
every token after the last layer (readout "all"), not in [CLS] alone.

Sentences: the first 10 positive and the first 10 negative of `builtin_sentiment_examples()`.

    python bench/graph_faithfulness.py                 # 20 sentences, 20 steps, 20 draws
    python bench/graph_faithfulness.py --sentences 4   # quicker

Prints a table per rule and the means; writes bench/results/<device>-graph_faithfulness.json.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import common  # noqa: E402

from attattr_fast import AttentionAttribution, load_classifier  # noqa: E402
from attattr_fast.datasets import builtin_sentiment_examples  # noqa: E402
from attattr_fast.graph import build_graph, graph_faithfulness  # noqa: E402
from attattr_fast.text import encode  # noqa: E402

RULES = (("algorithm1", {"method": "algorithm1", "tau": 0.4}),  # readout and tau_last from the scores
         ("release", {"method": "release", "tau": 0.4}))  # fmt: skip


def pick_sentences(count: int):
    examples = builtin_sentiment_examples()
    half = count // 2
    positive = [e for e in examples if e.label == "positive"][: count - half]
    negative = [e for e in examples if e.label == "negative"][:half]
    return positive + negative


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=20)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--method", default="riemann_right", help="quadrature rule")
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    device = common.pick_device(args.device)
    model, tokenizer = load_classifier(None)
    model = model.to(device)
    aa = AttentionAttribution(model)
    examples = pick_sentences(args.sentences)
    enc = encode(tokenizer, [e.text for e in examples])
    lengths = enc.attention_mask.sum(1)
    res = aa.attribute(enc.input_ids, enc.attention_mask, enc.token_type_ids, n_steps=args.steps, method=args.method,
                       output="reduced")  # fmt: skip

    rows = {name: [] for name, _ in RULES}
    for b, example in enumerate(examples):
        n = int(lengths[b])
        for name, options in RULES:
            graph = build_graph(res.layer_attr[b, :, :n, :n], enc.tokens[b], **options,
                                sep_token=tokenizer.sep_token)
            f = graph_faithfulness(aa.adapter, graph, enc.input_ids[b, :n], token_type_ids=enc.token_type_ids[b, :n],
                                   target=int(res.target[b]), draws=args.draws, seed=args.seed + b)  # fmt: skip
            rows[name].append({"example": b, "label": example.label, "n": n, "prob": f.prob, "edges": f.n_edges,
                               "graph_drop": f.graph_drop, "random_drop": f.random_drop,
                               "random_std": f.random_drop_std, "text": example.text[:48]})  # fmt: skip

    columns = [("example", "#", "d"), ("label", "label", "s"), ("n", "n", "d"), ("prob", "p", ".3f"),
               ("edges", "edges", "d"), ("graph_drop", "graph drop", "+.4f"), ("random_drop", "random drop", "+.4f"),
               ("random_std", "± draws", ".4f"), ("text", "text", "s")]  # fmt: skip
    summary = {}
    for name, options in RULES:
        table = rows[name]
        graph_drops = np.array([r["graph_drop"] for r in table])
        random_drops = np.array([r["random_drop"] for r in table])
        summary[name] = {
            **options,
            "mean_graph_drop": float(graph_drops.mean()),
            "mean_random_drop": float(random_drops.mean()),
            "median_graph_drop": float(np.median(graph_drops)),
            "median_random_drop": float(np.median(random_drops)),
            "graph_beats_random": int((graph_drops > random_drops).sum()),
            "mean_edges": float(np.mean([r["edges"] for r in table])),
        }
        s = summary[name]
        print(f"\n{name}: {options}")
        print(common.format_table(table, columns))
        print(f"mean drop: graph {s['mean_graph_drop']:+.4f}, random {s['mean_random_drop']:+.4f} "
              f"(median {s['median_graph_drop']:+.4f} vs {s['median_random_drop']:+.4f}); graph > random in "
              f"{s['graph_beats_random']} of {len(table)}; {s['mean_edges']:.1f} edges per graph")  # fmt: skip

    payload = {"environment": common.environment(device),
               "settings": {"sentences": len(examples), "steps": args.steps, "quadrature": args.method,
                            "draws": args.draws, "seed": args.seed, "model": "builtin:minilm-sentiment",
                            "selection": "first half positive, first half negative of builtin_sentiment_examples()",
                            "target": "predicted class"},
               "summary": summary, "rows": rows}  # fmt: skip
    path = common.write_json(payload, "graph_faithfulness", device)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
