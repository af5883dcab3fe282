"""Results directories (DESIGN §7): the format, its writer and its reader, in one module.

    DIR/manifest.json                 the run's settings (model and its weights' sha256, method, n_steps, dtype,
                                      layers, output, store dtype, input file and its sha256, …), package
                                      version, progress, and the list of finished shards with their checksums
    DIR/shard-00000.safetensors       the shard's tensors, keys "<index>/<field>"
    DIR/shard-00000.jsonl             one JSON object per example: index, tokens, text, label, target, prob, …
    DIR/shard-00000.commit.json       the shard's entry: example indices, line offsets, sizes and sha256 of both
    DIR/settings.json                 the settings alone, written once when the run starts: what `--repair`
                                      checks the shards against if manifest.json is damaged

Every file is written under a temporary name and renamed when complete. A shard counts as finished once its
commit record exists, and the commit is written last, so a run killed at any instant leaves finished shards,
which are kept, and at most some files without a commit, which are recomputed. Each process of a multi-process
run writes its own shards and commits; rank 0 merges the commits into manifest.json. The reader goes by
manifest.json, opens shards lazily and checks each shard's sha256 the first time it touches it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import Tensor

from attattr_fast.errors import AttAttrError

log = logging.getLogger(__name__)

FORMAT = "attattr-fast-results"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
SETTINGS = "settings.json"
COMMIT_SUFFIX = ".commit.json"
LOCK = ".lock"
TENSOR_FIELDS = ("head_max", "head_argmax", "layer_attr", "delta", "attributions", "attention",
                 "top_query", "top_key", "top_score")  # fmt: skip
WIDE_FIELDS = ("attributions", "attention", "layer_attr")  # the [.., n, n] tensors that --store-dtype applies to
SHIFT = ".exp2"  # suffix of the power-of-two scale stored next to a float16 tensor
META_FIELDS = ("index", "tokens", "text", "text_pair", "label", "target", "target_label", "prob", "layers")
# Settings that must match for a run to continue an existing directory (the rest, like batch size or the
# number of processes, changes how fast it goes, not what it computes).
# The targets count as resolved (targets_sha256): `--target 1` and `--target positive` name the same class.
RESUME_KEYS = ("version", "model", "input", "method", "n_steps", "dtype", "layers", "output", "targets_sha256",
               "top_k", "store_dtype", "truncate", "shard_size", "shard_bytes")  # fmt: skip
_SHARD_FILE = re.compile(r"^(shard-\d{5,})\.(safetensors|jsonl|commit\.json)$")
_TMP_FILE = re.compile(r"^\..+\.tmp-\d+$")
_SHARD_NAME = re.compile(r"^shard-\d{5,}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def atomic_write_bytes(path: Path, data: bytes | Sequence[bytes | np.ndarray]) -> None:
    """Write `data` (bytes, or buffers one after another) to `path` through a temporary file in the same directory
    and a rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for chunk in [data] if isinstance(data, bytes) else data:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename in (None, str(tmp)):  # say which file could not be written
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
        raise


def sha256_chunks(chunks: Iterable[bytes | np.ndarray]) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return sha256_chunks(iter(lambda: f.read(1 << 20), b""))


@dataclass
class Record:
    """One example's results. Tensors are at the example's real length n; read back as float32."""

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


def compact(record: Record) -> Record:
    """The record with CPU tensors that own their memory.

    Records sliced out of a batch result are views that keep the whole batch alive; this copy lets it go.
    """
    fields = {}
    for name in TENSOR_FIELDS:
        value = getattr(record, name)
        if value is not None:
            value = value.to(device="cpu", memory_format=torch.contiguous_format, copy=True)
        fields[name] = value
    return Record(**{k: getattr(record, k) for k in META_FIELDS}, **fields)


def shard_name(position: int) -> str:
    return f"shard-{position:05d}"


def record_bytes(n: int, n_layers: int, n_heads: int, full: bool) -> int:
    """Approximate bytes of one record of length n in memory, float32 (the wide tensors dominate)."""
    wide = n_layers * n * n * (1 + (2 * n_heads if full else 0))
    return 4 * wide + n_layers * n_heads * 24 + 40 * n + 256


def encode_wide(value: Tensor, store_dtype: torch.dtype) -> tuple[Tensor, int]:
    """(the tensor to store, its power-of-two shift). float16 values are stored times 2**shift, which puts the
    largest magnitude just below 2**15: attributions are often far below float16's smallest normal number
    (6e-5) and would lose their precision or vanish; scaled, each value keeps float16's 11 significant bits."""
    if store_dtype != torch.float16:
        return value.to(store_dtype), 0
    largest = 0.0
    if value.numel():
        low, high = torch.aminmax(value.float())  # one pass, where abs().max() takes two and a temporary
        largest = max(-float(low), float(high))
    shift = 0 if largest == 0.0 or not math.isfinite(largest) else 15 - math.frexp(largest)[1]
    return times_power_of_two(value, shift, torch.float16), shift


def decode_wide(value: Tensor, shift: int) -> Tensor:
    """float32 values of a stored wide tensor (multiplying by a power of two is exact)."""
    return times_power_of_two(value, -shift)


def times_power_of_two(value: Tensor, exponent: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """value · 2**exponent computed in float32 and rounded once to `dtype`, as in exact arithmetic. Where
    2**exponent itself is outside float32's range (scales for values near float32's smallest reach 2**163), in
    two steps: the first is exact for every float16 or float32 input whose result float32 or float16 can hold."""
    if not exponent:
        return value.to(dtype)
    first = exponent // 2 if abs(exponent) > 126 else exponent
    if exponent != first:
        value, first = value.float() * 2.0**first, exponent - first
    # one pass, no float32 temporary: the product is formed in float32 (the inputs' type) and rounded once
    return torch.mul(value.float(), 2.0**first, out=torch.empty(value.shape, dtype=dtype))


# safetensors' dtype names, in the order its writer stores tensors (then by name): the order is part of the bytes
SAFETENSORS_DTYPES = {np.dtype(name): code for name, code in [
    ("uint64", "U64"), ("int64", "I64"), ("float64", "F64"), ("float32", "F32"), ("uint32", "U32"),
    ("int32", "I32"), ("float16", "F16"), ("uint16", "U16"), ("int16", "I16"), ("int8", "I8"), ("uint8", "U8"),
    ("bool", "BOOL"),
]}  # fmt: skip
SAFETENSORS_RANK = {dtype: rank for rank, dtype in enumerate(SAFETENSORS_DTYPES)}


def safetensors_buffers(tensors: dict[str, np.ndarray]) -> list[bytes | np.ndarray]:
    """The bytes `safetensors.numpy.save(tensors)` returns, as its header followed by the arrays' own buffers.
    save copies every array into one bytes object, at a fraction of memcpy's speed: for a shard of full BERT-base
    records it took longer than the file's write, fsync and sha256 together (bench/write_throughput.py)."""
    order = sorted(tensors, key=lambda name: (SAFETENSORS_RANK[tensors[name].dtype], name))
    header, offset = {}, 0
    for name in order:
        array = tensors[name]
        header[name] = {"dtype": SAFETENSORS_DTYPES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}  # fmt: skip
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # safetensors pads the header to a multiple of 8 bytes
    return [len(text).to_bytes(8, "little"), text, *(np.ascontiguousarray(tensors[name]).reshape(-1).view(np.uint8)
                                                      for name in order)]  # fmt: skip


def write_shard(directory: str | Path, name: str, records: list[Record], store_dtype: torch.dtype = torch.float32,
                rank: int = 0) -> dict[str, Any]:
    """Write a shard's tensors and metadata, then its commit record; returns the commit (manifest entry)."""
    # the bytes safetensors.torch.save would write, from numpy views of the tensors (safetensors_buffers); numpy
    # has no bfloat16, which is stored as float32 (the engine's records hold float32 and int64 only)
    directory = Path(directory)
    tensors: dict[str, np.ndarray] = {}
    lines: list[bytes] = []
    for r in records:
        for field in TENSOR_FIELDS:
            value = getattr(r, field)
            if value is None:
                continue
            value = value.detach().cpu()
            if field in WIDE_FIELDS and value.is_floating_point():
                value, shift = encode_wide(value, store_dtype)
                if shift:
                    tensors[f"{r.index}/{field}{SHIFT}"] = np.array([shift], dtype=np.int32)
            if value.dtype == torch.bfloat16:
                value = value.float()
            tensors[f"{r.index}/{field}"] = value.contiguous().numpy()
        meta = {k: getattr(r, k) for k in META_FIELDS}
        lines.append((json.dumps(meta, ensure_ascii=False) + "\n").encode("utf-8"))
    offsets, pos = [], 0
    for line in lines:
        offsets.append(pos)
        pos += len(line)
    files = {f"{name}.safetensors": safetensors_buffers(tensors), f"{name}.jsonl": [b"".join(lines)]}
    for fname, chunks in files.items():
        atomic_write_bytes(directory / fname, chunks)
    commit = {
        "name": name,
        "rank": rank,
        "n": len(records),
        "indices": [int(r.index) for r in records],
        "offsets": offsets,
        "bytes": {fname: sum(len(chunk) for chunk in chunks) for fname, chunks in files.items()},
        "sha256": {fname: sha256_chunks(chunks) for fname, chunks in files.items()},
    }
    atomic_write_bytes(directory / f"{name}{COMMIT_SUFFIX}", json.dumps(commit).encode())
    return commit


def shard_problem(directory: Path, entry: dict[str, Any]) -> str | None:
    """None when both files of the shard are present and match their checksums, and the entry's line offsets
    and indices match the .jsonl file's lines, else what is wrong."""
    lines = b""  # the .jsonl file, read once for its checksum and its line offsets
    for fname, digest in entry["sha256"].items():
        path = directory / fname
        if not path.is_file():
            return f"{fname} is missing"
        size = path.stat().st_size
        if size != entry["bytes"][fname]:
            return f"{fname} has {size} bytes, its commit says {entry['bytes'][fname]}"
        if fname.endswith(".jsonl"):
            lines = path.read_bytes()
            actual = sha256_chunks([lines])
        else:
            actual = sha256_file(path)
        if actual != digest:
            return f"{fname} does not match its sha256"
    starts = [0, *(k + 1 for k in range(len(lines) - 1) if lines[k] == 0x0A)] if lines else []
    if starts != entry["offsets"]:
        return f"its commit's line offsets do not match {entry['name']}.jsonl"
    for start, index in zip(starts, entry["indices"]):
        try:
            found = json.loads(lines[start:lines.index(b"\n", start)]).get("index")
        except (ValueError, AttributeError):
            found = None
        if found != index:
            return f"its commit's example {index} is not on its line of {entry['name']}.jsonl"
    return None


def read_commits(directory: Path) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """(commit of every shard that has a readable one, {shard: problem} for unreadable commits)."""
    commits, problems = {}, {}
    for path in sorted(directory.glob(f"shard-*{COMMIT_SUFFIX}")):
        name = path.name[: -len(COMMIT_SUFFIX)]
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            if not _well_formed(entry) or entry["name"] != name:
                raise ValueError
            commits[name] = entry
        except (ValueError, UnicodeDecodeError):
            problems[name] = f"{path.name} is unreadable"
    return commits, problems


def _describe(key: str, settings: dict[str, Any]) -> str:
    """A setting of a run (a manifest or a run's meta) as the refusal to resume names it."""
    value = settings.get(key)
    if key == "targets_sha256":  # the resolved targets, after the option that chose them
        return f"{json.dumps(settings.get('target'))} (resolved targets sha256 {str(value)[:12]})"
    if key == "model" and isinstance(value, dict):
        config = f", config sha256 {str(value['config_sha256'])[:12]}" if value.get("config_sha256") else ""
        return f"{value.get('name')} (weights sha256 {str(value.get('sha256'))[:12]}{config})"
    if key == "input" and isinstance(value, dict):
        what = value.get("path") or f"{value.get('texts')} --text arguments"
        tokens = f", tokenized sha256 {str(value['encoded_sha256'])[:12]}" if value.get("encoded_sha256") else ""
        return f"{what} (sha256 {str(value.get('sha256'))[:12]}{tokens}, {value.get('n_examples')} examples)"
    return json.dumps(value)


def _identity(key: str, value: Any) -> Any:
    if key == "model" and isinstance(value, dict):
        return value.get("sha256"), value.get("config_sha256")
    if key == "input" and isinstance(value, dict):
        return value.get("sha256"), value.get("encoded_sha256"), value.get("n_examples")
    return value


def check_same_run(directory: Path, old: dict[str, Any], meta: dict[str, Any]) -> None:
    """Refuse to continue `old` (a manifest) with a run whose settings differ; one line naming every difference."""
    from attattr_fast import __version__

    meta = {**meta, "version": __version__}  # shards of two versions never share a directory
    diffs = [f"{key}: {_describe(key, old)} there, {_describe(key, meta)} now"
             for key in RESUME_KEYS if _identity(key, old.get(key)) != _identity(key, meta.get(key))]  # fmt: skip
    if diffs:
        raise AttAttrError(f"{directory} holds results of a different run ({'; '.join(diffs)}); "
                           "rerun with the same settings to resume it, or choose a new output directory")


class DirectoryLock:
    """An exclusive advisory lock on DIR/.lock for the life of a run; the OS drops it when the process dies."""

    def __init__(self, directory: Path):
        self.handle: BinaryIO | None = None
        try:
            import fcntl
        except ImportError:  # no flock (Windows): concurrent runs on one directory are the user's to avoid
            return
        self.handle = open(directory / LOCK, "a+b")
        try:
            fcntl.flock(self.handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.handle.close()
            self.handle = None
            raise AttAttrError(f"{directory} is in use by another run (it holds {directory / LOCK})") from None

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def open_run_directory(directory: str | Path, meta: dict[str, Any], plan: list[list[int]],
                       repair: bool = False) -> tuple[dict[str, dict[str, Any]], DirectoryLock]:
    """Create a results directory, or check that an existing one belongs to the same run and is intact.

    Args:
        directory: the results directory.
        meta: the run's settings (RESUME_KEYS among them) and descriptive fields for the manifest.
        plan: example indices of every shard; shard p is named `shard_name(p)`.
        repair: delete damaged shards (so that the run recomputes them), and rebuild a corrupt manifest,
            instead of refusing to go on.

    Returns:
        (commits of the finished shards by name, the directory lock held for the run).

    Raises:
        AttAttrError: not a results directory, a different run's directory, in use, or damaged shards or
            manifest without `repair` — each named, with how to recover. Nothing is written before these checks
            pass. With `repair`, a corrupt manifest is rebuilt from the commits that match `plan`, once
            settings.json shows the run's settings are `meta`'s.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise AttAttrError(f"{directory} exists and is not a directory")
    names = {shard_name(p): indices for p, indices in enumerate(plan)}
    # empty, or left so by a run killed while it wrote its first manifest (the lock, settings, temporary files)
    if not directory.exists() or all(p.name in (LOCK, SETTINGS) or _TMP_FILE.match(p.name)
                                     for p in directory.iterdir()):  # fmt: skip
        return _start(directory, meta, plan)

    if not (directory / MANIFEST).is_file() and not _has_commits(directory):
        if any(_SHARD_FILE.match(p.name) for p in directory.iterdir()):
            raise AttAttrError(f"{directory} holds shards but no {MANIFEST}: the settings that made them are lost, "
                               "so they cannot be checked against this run; move them aside or choose a new "
                               "output directory")  # fmt: skip
        raise AttAttrError(f"{directory} is not empty and has no {MANIFEST}: not a results directory; "
                           "choose a new output directory")  # fmt: skip
    try:
        old = read_manifest(directory)
        settings = old
    except CorruptManifest as exc:
        if not repair:
            raise
        settings = _read_settings(directory, exc)
        log.warning("repair: %s is %s; rebuilding it from %s and the shards' commits",
                    directory / MANIFEST, exc.why, SETTINGS)  # fmt: skip
        old = {**settings, "shards": []}
    if settings.get("format_version") != FORMAT_VERSION:
        raise AttAttrError(f"{directory} was written in results format {settings.get('format_version')}, this "
                           f"version writes format {FORMAT_VERSION}; choose a new output directory")  # fmt: skip
    try:
        check_same_run(directory, settings, meta)
    except AttAttrError:
        # a run that failed or was stopped before finishing any shard leaves nothing to keep: no reason to refuse
        if old["shards"] or any(_SHARD_FILE.match(p.name) for p in directory.iterdir()):
            raise
        lock = DirectoryLock(directory)  # a live run keeps its directory, and nothing is said of it
        log.warning("%s: its earlier run, with other settings, finished no shard; starting afresh", directory)
        return _start(directory, meta, plan, lock)
    lock = DirectoryLock(directory)
    try:
        commits, problems = read_commits(directory)
        for entry in old["shards"]:
            if entry["name"] not in commits and entry["name"] not in problems:
                problems[entry["name"]] = f"{entry['name']}{COMMIT_SUFFIX} is missing"
        for name, entry in commits.items():
            # the settings match (the tokenized input among them), so the plan is the one that made the shards:
            # a commit that disagrees with it is damaged
            if name not in names:
                problems[name] = f"{name}{COMMIT_SUFFIX} is for a shard this run does not have"
            elif names[name] != entry["indices"]:
                problems[name] = f"{name}{COMMIT_SUFFIX} lists other examples than this run plans for the shard"
            elif problem := shard_problem(directory, entry):
                problems[name] = problem
        if problems and not repair:
            listing = "; ".join(f"{name}: {why}" for name, why in sorted(problems.items()))
            raise AttAttrError(f"{directory}: {len(problems)} damaged shard(s) ({listing}); rerun the same command "
                               "with --repair to recompute them")  # fmt: skip
        for name in problems:
            log.warning("repair: recomputing %s (%s)", name, problems[name])
            commits.pop(name, None)
        _remove_leftovers(directory, set(commits))
        write_manifest(directory, meta, plan, commits, complete=False)
    except BaseException:
        lock.release()
        raise
    return commits, lock


def _start(directory: Path, meta: dict[str, Any], plan: list[list[int]],
           lock: DirectoryLock | None = None) -> tuple[dict, DirectoryLock]:
    """A new run in `directory` (made if missing; holding at most a lock, settings and temporary files, or a
    manifest without shards): settings.json, then the first manifest. `lock`: the directory's, if already held."""
    directory.mkdir(parents=True, exist_ok=True)
    lock = lock or DirectoryLock(directory)
    try:
        _remove_leftovers(directory, set())
        atomic_write_bytes(directory / SETTINGS, json.dumps(_run_header(meta), indent=1).encode("utf-8"))
        write_manifest(directory, meta, plan, {}, complete=False)
    except BaseException:
        lock.release()
        raise
    return {}, lock


def _run_header(meta: dict[str, Any]) -> dict[str, Any]:
    """What heads manifest.json and fills settings.json: format, versions and the run's settings."""
    from attattr_fast import __version__

    return {"format": FORMAT, "format_version": FORMAT_VERSION, "version": __version__, **meta}


def _read_settings(directory: Path, damage: CorruptManifest) -> dict[str, Any]:
    """settings.json, which a corrupt manifest's repair checks the run against; AttAttrError if it is unusable."""
    path = directory / SETTINGS
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        settings = None
    except (ValueError, UnicodeDecodeError):
        settings = False
    if not isinstance(settings, dict) or settings.get("format") != FORMAT:
        what = "missing" if settings is None else "damaged too"
        raise AttAttrError(f"{directory / MANIFEST} is {damage.why} and {SETTINGS}, the other record of "
                           f"the run's settings, is {what}: the shards cannot be checked against this run; choose "
                           "a new output directory")  # fmt: skip
    return settings


def _remove_leftovers(directory: Path, committed: set[str]) -> None:
    """Temporary files of a killed run, and shard files without a commit (they are recomputed)."""
    for path in directory.iterdir():
        match = _SHARD_FILE.match(path.name)
        if _TMP_FILE.match(path.name) or (match and match.group(1) not in committed):
            path.unlink()


def write_manifest(directory: Path, meta: dict[str, Any], plan: list[list[int]],
                   commits: dict[str, dict[str, Any]], complete: bool) -> None:
    """manifest.json: the settings, the progress and the finished shards (one line each)."""
    shards = [commits[name] for name in sorted(commits)]
    head = {**_run_header(meta), "n_examples": sum(len(p) for p in plan), "n_shards": len(plan),
            "n_done": sum(int(e["n"]) for e in shards), "complete": complete}  # fmt: skip
    # One line per shard keeps a long index list from spreading over thousands of lines.
    body = ",\n".join("    " + json.dumps(e, ensure_ascii=False, separators=(",", ":")) for e in shards)
    text = json.dumps(head, indent=2, ensure_ascii=False)[:-2] + ',\n  "shards": [\n' + body + "\n  ]\n}\n"
    atomic_write_bytes(directory / MANIFEST, text.encode("utf-8"))


class ResultsWriter:
    """Writes records you computed yourself in shards of `shard_size` examples; `close()` marks the run complete.

    `attattr-fast attribute` uses the resumable `corpus.run_corpus` instead; this writer is for one-shot use.
    """

    def __init__(self, directory: str | Path, meta: dict[str, Any], shard_size: int = 256,
                 store_dtype: torch.dtype = torch.float32):
        self.dir = Path(directory)
        if self.dir.exists() and (not self.dir.is_dir() or any(self.dir.iterdir())):
            raise AttAttrError(f"output directory {self.dir} exists and is not empty")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.meta = dict(meta)
        self.shard_size = shard_size
        self.store_dtype = store_dtype
        self.commits: dict[str, dict[str, Any]] = {}
        self.plan: list[list[int]] = []
        self.pending: list[Record] = []
        self.seen: set[int] = set()  # indices added
        self.n_written = 0
        write_manifest(self.dir, self.meta, self.plan, self.commits, complete=False)

    def add(self, record: Record) -> None:
        if int(record.index) in self.seen:
            raise AttAttrError(f"record index {record.index} was already added")
        self.seen.add(int(record.index))
        self.pending.append(record)
        if len(self.pending) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        name = shard_name(len(self.plan))
        self.commits[name] = write_shard(self.dir, name, self.pending, self.store_dtype)
        self.plan.append([r.index for r in self.pending])
        self.n_written += len(self.pending)
        self.pending = []
        write_manifest(self.dir, self.meta, self.plan, self.commits, complete=False)

    def close(self) -> None:
        self.flush()
        write_manifest(self.dir, self.meta, self.plan, self.commits, complete=True)


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The parsed manifest.json of a results directory (AttAttrError if absent or not one)."""
    path = Path(directory) / MANIFEST
    if not Path(directory).is_dir():
        if Path(directory).exists():
            raise AttAttrError(f"{directory} is a file, not a results directory")
        raise AttAttrError(f"results directory not found: {directory}")
    if not path.is_file():
        if _has_commits(Path(directory)):  # finished shards whose manifest was lost
            raise CorruptManifest(path, "missing")
        raise AttAttrError(f"{directory} is not a results directory (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CorruptManifest(path, "corrupt (not valid JSON)") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or "shards" not in manifest:
        if _has_commits(Path(directory)):  # our shards: the manifest is what is damaged
            raise CorruptManifest(path, "corrupt (not an attattr-fast manifest)")
        raise AttAttrError(f"{path} is not an attattr-fast manifest")
    shards = manifest["shards"]
    if not isinstance(shards, list) or not all(_well_formed(entry) for entry in shards):
        raise CorruptManifest(path, "corrupt (its list of shards is malformed)")
    return manifest


class CorruptManifest(AttAttrError):
    """A damaged manifest.json; `open_run_directory(repair=True)` rebuilds it from the shards' commits."""

    def __init__(self, path: Path, why: str):
        super().__init__(f"{path} is {why}; rerun the attribute command that wrote it, with --repair, "
                         "to rebuild it from the finished shards")  # fmt: skip
        self.why = why


def _has_commits(directory: Path) -> bool:
    return any(directory.glob(f"shard-*{COMMIT_SUFFIX}"))


def _well_formed(entry: Any) -> bool:
    """A shard entry as `write_shard` makes it: name, n, indices (non-negative) and increasing line offsets inside
    the .jsonl file, sizes and sha256 per file."""
    def ints(value):  # non-negative
        return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                               for v in value)  # fmt: skip

    if not (isinstance(entry, dict) and isinstance(entry.get("name"), str) and _SHARD_NAME.match(entry["name"])
            and ints(entry.get("indices")) and ints(entry.get("offsets"))
            and len(entry["indices"]) == len(entry["offsets"]) == entry.get("n")):  # fmt: skip
        return False
    files = {f"{entry['name']}.safetensors", f"{entry['name']}.jsonl"}
    sizes, digests = entry.get("bytes"), entry.get("sha256")
    if not (isinstance(sizes, dict) and isinstance(digests, dict) and set(sizes) == set(digests) == files
            and ints(list(sizes.values())) and all(isinstance(d, str) and _SHA256.match(d) for d in digests.values())):
        return False
    offsets = entry["offsets"]
    return all(a < b for a, b in zip(offsets, offsets[1:])) and (not offsets or
                                                                  offsets[-1] < sizes[f"{entry['name']}.jsonl"])


class Results(Sequence):
    """The records of a results directory in input order (len, indexing, slicing, iteration), read lazily.

    Only the touched records are read: their tensors through a memory map of the shard, their metadata by
    seeking to their line. A few shards stay open. In an incomplete run (`complete` False) position i is the
    i-th finished example, whose input position is `record.index`.
    """

    OPEN_SHARDS = 8

    def __init__(self, directory: str | Path, verify: bool = True):
        self.dir = Path(directory)
        self.manifest = read_manifest(self.dir)
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise AttAttrError(f"{self.dir} is in results format {self.manifest.get('format_version')}; "
                               f"this version reads format {FORMAT_VERSION}")  # fmt: skip
        listed_by = {entry["name"]: self.dir / MANIFEST for entry in self.manifest["shards"]}
        if not self.complete:  # a running or interrupted run refreshes its manifest only now and then
            shards = {entry["name"]: entry for entry in self.manifest["shards"]}
            commits, unreadable = read_commits(self.dir)
            for why in (why for name, why in sorted(unreadable.items()) if name not in shards):
                log.warning("%s: %s, so its examples are left out; rerun the attribute command that wrote it, "
                            "with --repair, to recompute them", self.dir, why)  # fmt: skip
            for name, entry in commits.items():  # every shard with a commit is finished
                if name not in shards:  # the manifest's entry, where it has one, is a copy of the commit
                    shards[name] = entry
                    listed_by[name] = self.dir / f"{name}{COMMIT_SUFFIX}"
            self.manifest["shards"] = [shards[name] for name in sorted(shards)]
        self.verify = verify
        self._where: dict[int, tuple[int, int]] = {}
        for s, shard in enumerate(self.manifest["shards"]):
            for pos, index in enumerate(shard["indices"]):
                if index in self._where:
                    raise AttAttrError(f"{listed_by[shard['name']]} is corrupt (example {index} is in two places)")
                self._where[index] = (s, pos)
        self.indices = sorted(self._where)
        if self.complete and len(self.indices) != self.manifest.get("n_examples"):
            raise AttAttrError(f"{self.dir / MANIFEST} is corrupt (complete, with {len(self.indices)} of "
                               f"{self.manifest.get('n_examples')} examples)")
        self._open: OrderedDict[int, tuple[Any, BinaryIO]] = OrderedDict()
        self._keys: dict[int, set[str]] = {}  # tensor names of each open shard
        self._verified: set[int] = set()
        if not self.complete:
            log.warning("%s: incomplete run, %d of %d examples present", self.dir, len(self),
                        self.manifest.get("n_examples", len(self)))

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        index = self.indices[i]
        s, pos = self._where[index]
        tensors, lines = self._shard(s)
        lines.seek(self.manifest["shards"][s]["offsets"][pos])
        meta = _record_meta(lines.readline(), index, self.manifest["shards"][s]["name"], self.dir)
        fields = {}
        keys = self._keys[s]
        for field in TENSOR_FIELDS:
            key = f"{index}/{field}"
            value = tensors.get_tensor(key) if key in keys else None
            if value is not None and value.is_floating_point():
                shift = int(tensors.get_tensor(key + SHIFT)[0]) if key + SHIFT in keys else 0
                value = decode_wide(value, shift)
            fields[field] = value
        return Record(**meta, **fields)

    def __iter__(self) -> Iterator[Record]:
        for i in range(len(self)):
            yield self[i]

    def close(self) -> None:
        for _, lines in self._open.values():
            lines.close()
        self._open.clear()

    def _shard(self, s: int) -> tuple[Any, BinaryIO]:
        if s in self._open:
            self._open.move_to_end(s)
            return self._open[s]
        from safetensors import SafetensorError, safe_open

        entry = self.manifest["shards"][s]
        name = entry["name"]
        if self.verify and s not in self._verified:
            problem = shard_problem(self.dir, entry)
            if problem:
                raise _damaged_shard(name, self.dir, f"is damaged ({problem})")
            self._verified.add(s)
        try:
            tensors = safe_open(str(self.dir / f"{name}.safetensors"), framework="pt")
            lines = open(self.dir / f"{name}.jsonl", "rb")
        except (SafetensorError, OSError) as exc:
            raise _damaged_shard(name, self.dir, f"cannot be read ({exc})") from None
        self._keys[s] = set(tensors.keys())
        self._open[s] = (tensors, lines)
        if len(self._open) > self.OPEN_SHARDS:
            old, (_, old_lines) = self._open.popitem(last=False)
            old_lines.close()
            self._keys.pop(old, None)
        return tensors, lines


def _record_meta(line: bytes, index: int, shard: str, directory: Path) -> dict[str, Any]:
    """The metadata line of example `index`, checked (a damaged line is an error, never a wrong record)."""
    try:
        meta = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        meta = None
    if not isinstance(meta, dict) or set(meta) != set(META_FIELDS) or meta["index"] != index:
        raise _damaged_shard(shard, directory, f"is damaged (the line of example {index} is unreadable)")
    return meta


def _damaged_shard(name: str, directory: Path, what: str) -> AttAttrError:
    """The reader's error for a shard it cannot use, with the way to recompute it."""
    return AttAttrError(f"shard {name} of {directory} {what}; rerun the attribute command that wrote it, "
                        "with --repair, to recompute it")


def load_results(directory: str | Path, verify: bool = True) -> Results:
    """The records of a results directory, in input order (len, indexing, iteration), read lazily.

    Args:
        directory: a directory written by `attattr-fast attribute --out` (or `ResultsWriter`).
        verify: check each shard's sha256 the first time one of its records is read.

    Returns:
        Results: a sequence of `Record`; tensors float32 whatever the stored dtype.
    """
    return Results(directory, verify=verify)
