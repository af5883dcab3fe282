"""Turning texts (and text pairs) into the model's input tensors, with the checks a user needs."""

from __future__ import annotations

import logging
import sys
from array import array
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


PADDED_FIELDS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class Tokenized:
    """Examples' tokens without padding, so a corpus costs its real tokens (padding it to its longest example
    would cost that length for every example); `padded` makes a batch's model inputs."""

    ids: Tensor  # int32 [T]: every example's token ids, one after another
    types: Tensor  # int32 [T]: their token types (segments)
    offsets: Tensor  # long [N + 1]: where each example starts in `ids`
    tokens: list[list[str]]  # the tokens of each example
    truncated: list[bool]
    pad_id: int

    @property
    def lengths(self) -> list[int]:
        return (self.offsets[1:] - self.offsets[:-1]).tolist()

    def example(self, i: int) -> tuple[list[int], list[int]]:
        """(token ids, token types) of example i."""
        span = slice(int(self.offsets[i]), int(self.offsets[i + 1]))
        return self.ids[span].tolist(), self.types[span].tolist()

    def padded(self, indices: list[int], n: int | None = None,
               fields: tuple[str, ...] = PADDED_FIELDS) -> tuple[Tensor, ...]:
        """(input_ids, attention_mask, token_type_ids), long [B, n], of these examples right-padded to n
        (None: the longest of them); or just the `fields` named, in their order."""
        index = torch.as_tensor(indices, dtype=torch.long)
        starts = self.offsets[index]
        lengths = self.offsets[index + 1] - starts
        n = int(lengths.max()) if n is None else n
        positions = torch.arange(n)
        real = positions < lengths.unsqueeze(1)
        source = (starts.unsqueeze(1) + positions)[real]  # row by row, as boolean indexing fills `real`

        def field(name: str) -> Tensor:
            if name == "attention_mask":
                return real.long()
            values, fill = (self.ids, self.pad_id) if name == "input_ids" else (self.types, 0)
            out = torch.full((len(index), n), fill, dtype=torch.long)
            out[real] = values[source].long()
            return out

        return tuple(field(name) for name in fields)


def model_max_length(tokenizer, adapter_max: int) -> int:
    limit = getattr(tokenizer, "model_max_length", None) or adapter_max
    return int(min(limit, adapter_max))


def tokenize(
    tokenizer,
    texts: list[str],
    text_pairs: list[str | None] | None = None,
    max_length: int = 512,
    truncate: bool = True,
) -> Tokenized:
    """Tokenise examples; empty text is an error, text past `max_length` tokens is truncated with a
    warning (or refused when `truncate` is False)."""
    if not texts:
        raise AttAttrError("no examples to encode")
    pairs = text_pairs or [None] * len(texts)
    ids, types, offsets, tokens, truncated = array("i"), array("i"), [0], [], []
    for begin in range(0, len(texts), TOKENIZE_BATCH):
        end = min(begin + TOKENIZE_BATCH, len(texts))
        # texts the tokenizer cannot take end the batch; the examples before them are checked first, so the
        # error names the first bad example, as one example at a time would
        bad = next(((i, why) for i in range(begin, end) if (why := _text_problem(i, texts[i], pairs[i]))), None)
        batch = range(begin, end if bad is None else bad[0])
        tokenless = _tokenless_segments(tokenizer, texts, pairs, batch)
        for i, (full, segments) in zip(batch, _tokenize_batch(tokenizer, texts, pairs, batch)):
            if len(full) <= tokenizer.num_special_tokens_to_add(pair=pairs[i] is not None) or (i, 0) in tokenless:
                raise AttAttrError(f"example {i}: the text has no tokens (only invisible characters?)")
            if (i, 1) in tokenless:
                raise AttAttrError(f"example {i}: the text pair has no tokens (only invisible characters?)")
            too_long = len(full) > max_length
            if too_long:
                if not truncate:
                    raise AttAttrError(f"example {i}: {len(full)} tokens, more than the model's {max_length}")
                log.warning("example %d: %d tokens truncated to %d", i, len(full), max_length)
                kept = tokenizer(texts[i], pairs[i], truncation=True, max_length=max_length)
                full, segments = kept["input_ids"], kept.get("token_type_ids")
            ids.extend(full)
            types.extend(segments or [0] * len(full))
            offsets.append(len(ids))
            truncated.append(too_long)
            tokens.append([sys.intern(t) for t in tokenizer.convert_ids_to_tokens(full)])
        if bad is not None:
            raise AttAttrError(bad[1])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return Tokenized(_int32(ids), _int32(types), torch.tensor(offsets), tokens, truncated, pad)


TOKENIZE_BATCH = 1024  # examples per tokenizer call: one call per example costs about twice as much


def _text_problem(i: int, text, pair) -> str | None:
    """Why example i cannot go to the tokenizer, or None."""
    if text is None or not str(text).strip():
        return f"example {i}: the text is empty"
    if pair is not None and not str(pair).strip():
        return f"example {i}: the text pair is empty"
    if not is_unicode(str(text)) or (pair is not None and not is_unicode(str(pair))):
        return f"example {i}: not valid Unicode text (a lone surrogate)"
    return None


def _tokenless_segments(tokenizer, texts: list, pairs: list, batch: range) -> set[tuple[int, int]]:
    """(example, segment) of the pairs in `batch` with a segment that has no tokens: the pair as a whole does."""
    paired = [i for i in batch if pairs[i] is not None]
    if not paired:
        return set()
    pieces = [tokenizer([segment[i] for i in paired], add_special_tokens=False)["input_ids"]
              for segment in (texts, pairs)]
    return {(i, s) for s, per_example in enumerate(pieces) for i, ids in zip(paired, per_example) if not ids}


def _tokenize_batch(tokenizer, texts: list, pairs: list, batch: range) -> list[tuple[list[int], list[int] | None]]:
    """(untruncated token ids, token types or None) of examples `batch`, in order: one tokenizer call for the
    single texts among them and one for the pairs."""
    out = {}
    singles = [i for i in batch if pairs[i] is None]
    paired = [i for i in batch if pairs[i] is not None]
    for indices, second in ((singles, None), (paired, [pairs[i] for i in paired])):
        if indices:
            encoded = tokenizer([texts[i] for i in indices], second, truncation=False, add_special_tokens=True)
            segments = encoded.get("token_type_ids") or [None] * len(indices)
            out.update(zip(indices, zip(encoded["input_ids"], segments)))
    return [out[i] for i in batch]


def _int32(values: array) -> Tensor:
    """An array('i') as its own int32 tensor (a copy: the tensor must not depend on the array's buffer)."""
    return torch.frombuffer(values, dtype=torch.int32).clone()


def encode(
    tokenizer,
    texts: list[str],
    text_pairs: list[str | None] | None = None,
    max_length: int = 512,
    truncate: bool = True,
) -> Encoded:
    """`tokenize`, right-padded to the longest example: the model's input tensors."""
    tokenized = tokenize(tokenizer, texts, text_pairs, max_length, truncate)
    ids, mask, types = tokenized.padded(list(range(len(tokenized.tokens))))
    return Encoded(ids, mask, types, tokenized.tokens, tokenized.truncated)
