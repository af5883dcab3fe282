"""Turning texts (and text pairs) into the model's input tensors, with the checks a user needs."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from attattr_fast.datasets import is_unicode
from attattr_fast.errors import AttAttrError

log = logging.getLogger(__name__)


@dataclass
class Encoded:
    input_ids: Tensor  # long [B, n], right-padded
    attention_mask: Tensor  # long [B, n]
    token_type_ids: Tensor  # long [B, n]
    tokens: list[list[str]]  # real tokens of each example
    truncated: list[bool]


def model_max_length(tokenizer, adapter_max: int) -> int:
    limit = getattr(tokenizer, "model_max_length", None) or adapter_max
    return int(min(limit, adapter_max))


def encode(
    tokenizer,
    texts: list[str],
    text_pairs: list[str | None] | None = None,
    max_length: int = 512,
    truncate: bool = True,
) -> Encoded:
    """Tokenise examples; empty text is an error, text past `max_length` tokens is truncated with a
    warning (or refused when `truncate` is False)."""
    if not texts:
        raise AttAttrError("no examples to encode")
    pairs = text_pairs or [None] * len(texts)
    rows, tokens, truncated = [], [], []
    for i, (text, pair) in enumerate(zip(texts, pairs)):
        if text is None or not str(text).strip():
            raise AttAttrError(f"example {i}: the text is empty")
        if pair is not None and not str(pair).strip():
            raise AttAttrError(f"example {i}: the text pair is empty")
        if not is_unicode(str(text)) or (pair is not None and not is_unicode(str(pair))):
            raise AttAttrError(f"example {i}: not valid Unicode text (a lone surrogate)")
        full = tokenizer(text, pair, truncation=False, add_special_tokens=True)
        if len(full["input_ids"]) <= tokenizer.num_special_tokens_to_add(pair=pair is not None):
            raise AttAttrError(f"example {i}: the text has no tokens (only invisible characters?)")
        too_long = len(full["input_ids"]) > max_length
        if too_long:
            if not truncate:
                raise AttAttrError(
                    f"example {i}: {len(full['input_ids'])} tokens, more than the model's {max_length}"
                )
            log.warning("example %d: %d tokens truncated to %d", i, len(full["input_ids"]), max_length)
            full = tokenizer(text, pair, truncation=True, max_length=max_length)
        rows.append(full)
        truncated.append(too_long)
        tokens.append(tokenizer.convert_ids_to_tokens(full["input_ids"]))
    n = max(len(r["input_ids"]) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), n), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    types = torch.zeros((len(rows), n), dtype=torch.long)
    for b, r in enumerate(rows):
        m = len(r["input_ids"])
        ids[b, :m] = torch.tensor(r["input_ids"])
        mask[b, :m] = 1
        if "token_type_ids" in r:
            types[b, :m] = torch.tensor(r["token_type_ids"])
    return Encoded(ids, mask, types, tokens, truncated)
