"""The literal loop (`attattr_fast.reference`) against the engine on the same inputs (issue 2, item 11).

For every case: correctness first (the engine's attributions against the literal loop's, worst layer's
max |difference| / max |reference|, DESIGN §6's float32 tolerance), then time at the same method and
n_steps; then a table of accuracy against cost: Gauss–Legendre with 2–8 nodes and riemann_right 20,
each against a 64-node Gauss–Legendre result of the engine.

Cases: a BERT-base-shaped random model (12 layers, 12 heads, hidden 768) at n = 32 and n = 128, 4
examples each, and the built-in MiniLM sentiment model on 4 review sentences of 20–40 tokens.

    python bench/bench_engine.py            # all cases (long on a CPU: the literal loop at n = 128)
    python bench/bench_engine.py --quick    # CI: MiniLM in full, the BERT-base cases cut down

Prints the tables and writes bench/results/<device>-bench_engine[-quick].json.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import common  # noqa: E402

from attattr_fast import AttentionAttribution, reference  # noqa: E402
from attattr_fast.api import resolve_backend  # noqa: E402

TOLERANCE = 1e-5  # DESIGN §6: float32, relative to the reference's largest magnitude, per layer
CONVERGED = ("gausslegendre", 64)
DEFAULT_CASES = "base32,base128,minilm"
ACCURACY_RULES = [("gausslegendre", k) for k in range(2, 9)] + [("riemann_right", 20)]

# Four review sentences of 20–40 MiniLM tokens (with [CLS] and [SEP]), two positive and two negative.
MINILM_SENTENCES = [
    "The acting is superb, the score is gorgeous, and the final scene left the whole theatre quietly in tears.",
    "I wanted to like this film, but the plot drags, the jokes fall flat, and the ending makes no sense at all.",
    "A warm, funny and beautifully shot story about two sisters who rediscover each other after years apart.",
    "Two hours of shouting, cheap effects and wooden dialogue; I checked my watch more often than the screen.",
]


@dataclass
class Case:
    name: str
    model: torch.nn.Module
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor
    layers: list[int] | None  # None: all
    accuracy_table: bool

    @property
    def lengths(self) -> list[int]:
        return self.attention_mask.sum(1).tolist()


def build_cases(args, device: torch.device) -> list[Case]:
    cases = []
    wanted = set(args.cases.split(","))
    if wanted & {"base32", "base128"}:
        model = common.random_bert(device=device)
        vocab = model.config.vocab_size
        for n in (32, 128):
            if f"base{n}" not in wanted:
                continue
            examples = args.base_examples
            ids, mask, types = common.random_batch([n] * examples, vocab, seed=n)
            layers = None if args.base_layers is None else [int(x) for x in args.base_layers.split(",")]
            cases.append(Case(f"bert-base n={n}", model, ids.to(device), mask.to(device), types.to(device), layers,
                              accuracy_table=not args.quick))
    if "minilm" in wanted:
        from attattr_fast.models import load_classifier
        from attattr_fast.text import encode

        model, tokenizer = load_classifier(None)
        model = model.to(device)
        enc = encode(tokenizer, MINILM_SENTENCES)
        lengths = enc.attention_mask.sum(1).tolist()
        if not all(20 <= n <= 40 for n in lengths):
            raise SystemExit(f"the MiniLM sentences must have 20-40 tokens, got {lengths}")
        cases.append(Case("minilm 4 sentences", model, enc.input_ids.to(device), enc.attention_mask.to(device),
                          enc.token_type_ids.to(device), None, accuracy_table=True))
    return cases


def per_layer_check(engine_attr: torch.Tensor, ref_attr: torch.Tensor) -> list[float]:
    """Per target layer: max |engine − reference| / max |reference| (both [B, L', H, n, n])."""
    out = []
    for li in range(ref_attr.shape[1]):
        diff = float((engine_attr[:, li].double() - ref_attr[:, li].double()).abs().max())
        scale = float(ref_attr[:, li].abs().max())
        out.append(diff / scale if scale > 0 else diff)
    return out


def run_case(case: Case, args, device: torch.device) -> dict:
    aa = AttentionAttribution(case.model)
    inputs = (case.input_ids, case.attention_mask, case.token_type_ids)
    n_layers = case.model.config.num_hidden_layers
    n_target = n_layers if case.layers is None else len(case.layers)
    common_kw = dict(layers=case.layers, output="full")
    engine_kw = dict(backend=args.backend, result_device=device, **common_kw)
    method, steps = args.method, args.steps
    print(f"\n== {case.name}: {len(case.lengths)} examples, lengths {case.lengths}, {n_target} of {n_layers} layers")

    # 1. Correctness: the literal loop and the engine at the same method and n_steps.
    warm = (case.input_ids[:1], case.attention_mask[:1], case.token_type_ids[:1])
    literal = common.measure(
        lambda: reference.attribute(case.model, *inputs, n_steps=steps, method=method, **common_kw),
        device, repeats=1, warmup=1,
        warmup_fn=lambda: reference.attribute(case.model, *warm, n_steps=1, method=method,
                                              layers=[n_layers - 1], output="full"))
    engine = common.measure(
        lambda: aa.attribute(*inputs, n_steps=steps, method=method, **engine_kw), device,
        repeats=args.repeats, warmup=1,
        warmup_fn=lambda: aa.attribute(*warm, n_steps=2, method=method, **engine_kw))
    ref_res, eng_res = literal.result, engine.result
    layer_errors = per_layer_check(eng_res.attributions.cpu(), ref_res.attributions.cpu())
    targets_equal = bool(torch.equal(eng_res.target.cpu(), ref_res.target.cpu()))
    prob_diff = float((eng_res.prob.cpu() - ref_res.prob.cpu()).abs().max())
    correct = max(layer_errors) <= TOLERANCE and targets_equal
    examples = len(case.lengths)
    row = {
        "case": case.name, "examples": examples, "lengths": case.lengths, "layers": case.layers or "all",
        "target_layers": n_target, "method": method, "n_steps": steps,
        "max_rel_diff": max(layer_errors), "max_rel_diff_per_layer": layer_errors, "tolerance": TOLERANCE,
        "targets_equal": targets_equal, "max_prob_diff": prob_diff, "correct": correct,
        "literal_s": literal.seconds, "engine_s": engine.seconds,
        "speedup": literal.seconds / engine.seconds,
        "literal_ex_per_s": examples / literal.seconds, "engine_ex_per_s": examples / engine.seconds,
        "literal_timing": literal.as_dict(), "engine_timing": engine.as_dict(),
    }
    print(f"correctness: max rel diff {row['max_rel_diff']:.2e} (tolerance {TOLERANCE:.0e}), "
          f"targets equal {targets_equal}, max |prob diff| {prob_diff:.1e} -> {'OK' if correct else 'FAILED'}")
    print(f"time ({method} {steps}): literal loop {literal.seconds:.2f} s, engine {engine.seconds:.2f} s "
          f"(median of {args.repeats}), speed-up {row['speedup']:.2f}x")

    # 2. Accuracy against cost, all against the engine's 64-node Gauss–Legendre result.
    if case.accuracy_table:
        row["accuracy"] = accuracy_table(case, aa, inputs, engine_kw, literal.seconds, args, device)
    return row


def accuracy_table(case: Case, aa, inputs, engine_kw, literal_seconds: float, args, device) -> dict:
    converged = aa.attribute(*inputs, method=CONVERGED[0], n_steps=CONVERGED[1], **engine_kw)
    converged_attr = converged.attributions.cpu()
    rows = []
    for method, steps in ACCURACY_RULES:
        timing = common.measure(lambda m=method, s=steps: aa.attribute(*inputs, method=m, n_steps=s, **engine_kw),
                                device, repeats=args.repeats, warmup=0)
        res = timing.result
        span = (res.prob.cpu().unsqueeze(1) - res.baseline.cpu()).abs()  # |F(A) − F(0)| [B, L']
        rows.append({
            "method": method, "nodes": steps,
            "rel_error": common.relative_error(res.attributions.cpu(), converged_attr),
            "max_rel_delta": float((res.delta.cpu().abs() / span.clamp_min(1e-12)).max()),
            "seconds": timing.seconds, "timing": timing.as_dict(),
            "speedup_vs_literal_rr20": literal_seconds / timing.seconds,
        })
    rr20 = rows[-1]
    matching = [r for r in rows[:-1] if r["rel_error"] <= rr20["rel_error"]]
    best = min(matching, key=lambda r: r["nodes"]) if matching else None
    for r in rows:
        r["speedup_vs_engine_rr20"] = rr20["seconds"] / r["seconds"]
    print(f"accuracy vs cost (error: worst layer's max |attr - GL64| / max |GL64|; "
          f"speed-up vs the literal loop at {args.method} {args.steps}, {literal_seconds:.2f} s)")
    print(common.format_table(rows, [
        ("method", "method", ""), ("nodes", "nodes", "d"), ("rel_error", "rel. error", ".2e"),
        ("max_rel_delta", "max |delta|/|F(A)-F(0)|", ".1e"), ("seconds", "engine s", ".3f"),
        ("speedup_vs_literal_rr20", "x literal", ".1f"), ("speedup_vs_engine_rr20", "x engine rr20", ".2f"),
    ]))
    if best:
        print(f"fewest Gauss-Legendre nodes at riemann_right 20's accuracy: {best['nodes']} "
              f"({best['rel_error']:.2e} <= {rr20['rel_error']:.2e}), "
              f"{best['speedup_vs_literal_rr20']:.1f}x the literal loop")
    else:
        print("no Gauss-Legendre rule with 2-8 nodes reaches riemann_right 20's accuracy here")
    return {"reference": f"engine {CONVERGED[0]} {CONVERGED[1]}", "rows": rows,
            "matching_gausslegendre_nodes": best["nodes"] if best else None,
            "matching_speedup_vs_literal_rr20": best["speedup_vs_literal_rr20"] if best else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="CI mode: BERT-base cases with 1 example and target layers 0 and 11, "
                             "accuracy table for MiniLM only, 1 timed repeat")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--cases", default=DEFAULT_CASES, help="comma list of base32, base128, minilm")
    parser.add_argument("--base-examples", type=int, default=None, help="examples per BERT-base case (default 4)")
    parser.add_argument("--base-layers", default=None, help="target layers of the BERT-base cases (default all)")
    parser.add_argument("--method", default="riemann_right")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--backend", default=None,
                        help="engine backend: auto, torch or triton (default: auto on CUDA, torch on the CPU, "
                             "so that TRITON_INTERPRET=1 in the environment never selects the interpreter)")
    parser.add_argument("--repeats", type=int, default=None, help="timed engine calls (median; default 3, quick 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's, or 1 when the CPU is busy)")
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = parser.parse_args(argv)
    if args.quick:
        args.base_examples = args.base_examples or 1
        args.base_layers = args.base_layers or "0,11"
        args.repeats = args.repeats or 1
    args.base_examples = args.base_examples or 4
    args.repeats = args.repeats or 3
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("transformers", "attattr_fast"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    torch.manual_seed(0)

    device = common.pick_device(args.device)
    threads_note = common.set_threads(args.threads, device)
    args.backend = args.backend or ("auto" if device.type == "cuda" else "torch")
    env = common.environment(device)
    backend_fn = resolve_backend(args.backend, device)
    resolved = "triton" if "triton" in backend_fn.__name__ else "torch"
    print(f"device: {env['device']}; torch {env['versions']['torch']}, transformers {env['versions']['transformers']}; "
          f"git {env['git']['commit'][:10]}{' (dirty)' if env['git']['dirty'] else ''}; engine backend {resolved}")
    warning = common.load_warning(device)
    if warning:
        print(warning)
        env["load_warning"] = warning
    if threads_note:
        print(threads_note)
        env["threads_note"] = threads_note
    started = time.perf_counter()
    results = [run_case(case, args, device) for case in build_cases(args, device)]

    print("\n== summary: literal loop (attattr_fast.reference) vs engine, same method and n_steps")
    print(common.format_table(results, [
        ("case", "case", ""), ("examples", "ex", "d"), ("target_layers", "layers", "d"), ("method", "method", ""),
        ("n_steps", "steps", "d"), ("max_rel_diff", "max rel diff", ".1e"), ("literal_s", "literal s", ".2f"),
        ("engine_s", "engine s", ".2f"), ("speedup", "speed-up", ".2f"),
        ("literal_ex_per_s", "literal ex/s", ".3f"), ("engine_ex_per_s", "engine ex/s", ".3f"),
    ]))
    bars = []
    for r in results:
        if r["case"].startswith("minilm") and r["method"] == "riemann_right" and r["n_steps"] == 20:
            bars.append(("engine at riemann_right 20 >= 1.3x the literal loop", r["speedup"], 1.3))
            acc = r.get("accuracy")
            if acc and acc["matching_speedup_vs_literal_rr20"] is not None:
                bars.append((f"gausslegendre {acc['matching_gausslegendre_nodes']} (riemann_right 20's accuracy) "
                             ">= 5x the literal loop", acc["matching_speedup_vs_literal_rr20"], 5.0))
    for text, value, bar in bars:
        print(f"bar (MiniLM, 4 sentences): {text}: {value:.2f}x -> {'met' if value >= bar else 'MISSED'}")
    failed = [r["case"] for r in results if not r["correct"]]
    if failed:
        print(f"CORRECTNESS FAILED: {', '.join(failed)}")

    payload = {
        "benchmark": "bench_engine", "environment": env,
        "settings": {**vars(args), "engine_backend_resolved": resolved, "tolerance": TOLERANCE,
                     "converged_reference": list(CONVERGED), "accuracy_rules": ACCURACY_RULES,
                     "minilm_sentences": MINILM_SENTENCES, "bert_base_seed": 0, "timing": "median of repeats; "
                     "literal loop timed once after a one-layer one-step warm-up"},
        "cases": results, "bars": [{"what": t, "value": v, "bar": b, "met": v >= b} for t, v, b in bars],
        "wall_seconds": time.perf_counter() - started,
    }
    name = "bench_engine" + ("-quick" if args.quick else "")
    if args.cases != DEFAULT_CASES:
        name += "-" + "+".join(args.cases.split(","))
    path = common.write_json(payload, name, device, args.out)
    print(f"\nwrote {path} ({payload['wall_seconds']:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
