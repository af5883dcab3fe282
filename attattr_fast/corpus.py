"""Attributing a list of examples: encode, batch by length, run the engine, yield per-example records."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from attattr_fast.api import AttentionAttribution
from attattr_fast.datasets import Example, label_index
from attattr_fast.errors import AttAttrError
from attattr_fast.results import Record
from attattr_fast.text import Encoded, encode, model_max_length

log = logging.getLogger(__name__)


@dataclass
class PreparedCorpus:
    examples: list[Example]
    encoded: Encoded
    gold: list[int | None]  # class index of each example's label


def prepare(aa: AttentionAttribution, tokenizer, examples: list[Example], truncate: bool = True) -> PreparedCorpus:
    """Tokenise and check every example up front, so bad input fails before anything is written."""
    adapter = aa.adapter
    config = adapter.config
    label2id = dict(getattr(config, "label2id", {}) or {})
    gold = [None if e.label is None else label_index(e.label, label2id, adapter.num_labels) for e in examples]
    encoded = encode(tokenizer, [e.text for e in examples], [e.text_pair for e in examples],
                     max_length=model_max_length(tokenizer, adapter.max_length), truncate=truncate)
    return PreparedCorpus(examples, encoded, gold)


def resolve_targets(target: str, corpus: PreparedCorpus, aa: AttentionAttribution) -> list[int | None]:
    """`predicted` → None per example; `gold` → the label; a label name → that class for all."""
    if target == "predicted":
        return [None] * len(corpus.examples)
    if target == "gold":
        missing = [i for i, g in enumerate(corpus.gold) if g is None]
        if missing:
            raise AttAttrError(f"--target gold: example {missing[0]} has no label")
        return list(corpus.gold)
    index = label_index(target, dict(getattr(aa.adapter.config, "label2id", {}) or {}), aa.adapter.num_labels)
    return [index] * len(corpus.examples)


def attribute_corpus(
    aa: AttentionAttribution,
    corpus: PreparedCorpus,
    targets: list[int | None],
    batch_size: int = 8,
    top_k: int = 5,
    progress: bool = True,
    **options,
) -> Iterator[Record]:
    """Records of every example, batches of similar length; `options` go to `attribute`."""
    from tqdm.auto import tqdm

    enc = corpus.encoded
    id2label = dict(getattr(aa.adapter.config, "id2label", {}) or {})
    lengths = enc.attention_mask.sum(1)
    order = torch.sort(lengths, stable=True).indices.tolist()
    bar = tqdm(total=len(order), unit="ex", disable=not progress, desc="attributing")
    for begin in range(0, len(order), batch_size):
        idx = order[begin : begin + batch_size]
        n = int(lengths[idx].max())
        batch_targets = [targets[i] for i in idx]
        target = None
        if any(t is not None for t in batch_targets):
            # mixed predicted/explicit targets cannot occur: resolve_targets gives all or none
            target = torch.tensor(batch_targets, dtype=torch.long)
        res = aa.attribute(enc.input_ids[idx, :n], enc.attention_mask[idx, :n], enc.token_type_ids[idx, :n],
                           target=target, top_k=top_k, **options)  # fmt: skip
        for b, i in enumerate(idx):
            m = int(lengths[i])
            example = corpus.examples[i]
            t = int(res.target[b])
            yield Record(
                index=i,
                tokens=enc.tokens[i],
                text=example.text,
                text_pair=example.text_pair,
                label=example.label,
                target=t,
                target_label=id2label.get(t, str(t)),
                prob=float(res.prob[b]),
                layers=list(res.layers),
                head_max=res.head_max[b],
                head_argmax=res.head_argmax[b],
                layer_attr=res.layer_attr[b, :, :m, :m],
                delta=res.delta[b],
                attributions=None if res.attributions is None else res.attributions[b, :, :, :m, :m],
                attention=None if res.attention is None else res.attention[b, :, :, :m, :m],
                top_query=None if res.top_k is None else res.top_k.query[b],
                top_key=None if res.top_k is None else res.top_k.key[b],
                top_score=None if res.top_k is None else res.top_k.score[b],
            )
        bar.update(len(idx))
    bar.close()
