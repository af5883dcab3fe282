"""Results directories (DESIGN §7): the writer and its reader, in one module.

    DIR/manifest.json             model, method, n_steps, dtype, layers, output, version, input, shards
    DIR/shard-00000.safetensors   tensors of the shard's examples, keys "<index>/<field>"
    DIR/shard-00000.jsonl         one JSON object per example: index, tokens, text, label, target, prob, …

Every file is written under a temporary name and renamed when complete; the manifest lists only
complete shards, so a reader never sees half an example.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from attattr_fast.errors import AttAttrError

FORMAT = "attattr-fast-results"
FORMAT_VERSION = 1
TENSOR_FIELDS = ("head_max", "head_argmax", "layer_attr", "delta", "attributions", "attention",
                 "top_query", "top_key", "top_score")  # fmt: skip


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Record:
    """One example's results. Tensors are float32 at the example's real length n."""

    index: int
    tokens: list[str]
    text: str | None
    text_pair: str | None
    label: str | None
    target: int
    target_label: str | None
    prob: float
    layers: list[int]
    head_max: Tensor  # [L', H]
    head_argmax: Tensor  # long [L', H, 2]
    layer_attr: Tensor | None  # [L', n, n]
    delta: Tensor  # [L']
    attributions: Tensor | None  # [L', H, n, n] ("full" output only)
    attention: Tensor | None  # [L', H, n, n] ("full" output only)
    top_query: Tensor | None = None  # [L', k]
    top_key: Tensor | None = None
    top_score: Tensor | None = None


class ResultsWriter:
    """Writes records in shards of `shard_size` examples; `close()` marks the run complete."""

    def __init__(self, directory: str | Path, meta: dict[str, Any], shard_size: int = 256,
                 store_dtype: torch.dtype = torch.float32):
        self.dir = Path(directory)
        if self.dir.exists() and any(self.dir.iterdir()):
            raise AttAttrError(f"output directory {self.dir} exists and is not empty")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.meta = dict(meta)
        self.shard_size = shard_size
        self.store_dtype = store_dtype
        self.shards: list[dict[str, Any]] = []
        self.pending: list[Record] = []
        self.n_written = 0
        self._write_manifest(complete=False)

    def add(self, record: Record) -> None:
        self.pending.append(record)
        if len(self.pending) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        from safetensors.torch import save

        name = f"shard-{len(self.shards):05d}"
        tensors: dict[str, Tensor] = {}
        lines = []
        for r in self.pending:
            for field in TENSOR_FIELDS:
                value = getattr(r, field)
                if value is None:
                    continue
                if value.is_floating_point() and field in ("attributions", "attention", "layer_attr"):
                    value = value.to(self.store_dtype)
                tensors[f"{r.index}/{field}"] = value.contiguous().cpu()
            meta = {k: getattr(r, k) for k in ("index", "tokens", "text", "text_pair", "label", "target",
                                              "target_label", "prob", "layers")}  # fmt: skip
            lines.append(json.dumps(meta, ensure_ascii=False))
        tensor_path = self.dir / f"{name}.safetensors"
        meta_path = self.dir / f"{name}.jsonl"
        atomic_write_bytes(tensor_path, save(tensors))
        atomic_write_bytes(meta_path, ("\n".join(lines) + "\n").encode("utf-8"))
        self.shards.append({
            "name": name,
            "indices": [r.index for r in self.pending],
            "sha256": {tensor_path.name: sha256_file(tensor_path), meta_path.name: sha256_file(meta_path)},
        })  # fmt: skip
        self.n_written += len(self.pending)
        self.pending = []
        self._write_manifest(complete=False)

    def close(self) -> None:
        self.flush()
        self._write_manifest(complete=True)

    def _write_manifest(self, complete: bool) -> None:
        from attattr_fast import __version__

        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "version": __version__, **self.meta,
                    "n_examples": self.n_written, "complete": complete, "shards": self.shards}  # fmt: skip
        atomic_write_bytes(self.dir / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / "manifest.json"
    if not Path(directory).is_dir():
        raise AttAttrError(f"results directory not found: {directory}")
    if not path.is_file():
        raise AttAttrError(f"{directory} is not a results directory (no manifest.json)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise AttAttrError(f"{path} is corrupt (not valid JSON)") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or "shards" not in manifest:
        raise AttAttrError(f"{path} is not an attattr-fast manifest")
    return manifest


class Results(Sequence):
    """The records of a results directory in input order; shards are read when first touched."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.manifest = read_manifest(self.dir)
        self._where: dict[int, tuple[int, int]] = {}
        for s, shard in enumerate(self.manifest["shards"]):
            for pos, index in enumerate(shard["indices"]):
                self._where[int(index)] = (s, pos)
        self._order = sorted(self._where)
        self._cache: tuple[int, list[Record]] | None = None

    def __len__(self) -> int:
        return len(self._order)

    def __getitem__(self, i: int) -> Record:  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        s, pos = self._where[self._order[i]]
        return self._shard(s)[pos]

    def __iter__(self) -> Iterator[Record]:
        for i in range(len(self)):
            yield self[i]

    def _shard(self, s: int) -> list[Record]:
        if self._cache is not None and self._cache[0] == s:
            return self._cache[1]
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        name = self.manifest["shards"][s]["name"]
        tensor_path, meta_path = self.dir / f"{name}.safetensors", self.dir / f"{name}.jsonl"
        for p in (tensor_path, meta_path):
            if not p.is_file():
                raise AttAttrError(f"shard file missing: {p}")
        try:
            tensors = load_file(str(tensor_path))
            metas = [json.loads(line) for line in meta_path.read_text(encoding="utf-8").splitlines() if line]
        except (SafetensorError, json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
            raise AttAttrError(f"shard {name} in {self.dir} is corrupt ({exc})") from None
        records = []
        for meta in metas:
            fields = {f: (tensors[f"{meta['index']}/{f}"].float() if f"{meta['index']}/{f}" in tensors and
                          tensors[f"{meta['index']}/{f}"].is_floating_point() else tensors.get(f"{meta['index']}/{f}"))
                      for f in TENSOR_FIELDS}  # fmt: skip
            records.append(Record(**meta, **fields))
        self._cache = (s, records)
        return records


def load_results(directory: str | Path) -> Results:
    """The records of a results directory, in input order (len, indexing, iteration)."""
    return Results(directory)
