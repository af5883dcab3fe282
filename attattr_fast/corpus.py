"""Attributing a corpus: encode, bucket by length, size each engine call from a memory budget, write shards.

`attribute_corpus` streams records (nothing written); `run_corpus` writes a resumable results directory
(`results`), one shard at a time, and under torchrun spreads the shards over the processes (`distributed`).

Scheduling. Examples are sorted by token count (stable) and cut into shards of `shard_size` examples (fewer
when long examples would make a shard bigger than SHARD_BYTES); the plan depends only on the encoded input, so
a resumed run, with any number of processes, finds the same shards. Within a shard, consecutive examples form
an engine call as long as its rows (examples × layers × quadrature nodes) fit the memory budget at the call's
longest length; the engine runs every call at that length, so little is padded. A CUDA out-of-memory error
halves the budget for the rest of the run and retries the same examples; finished batches are kept.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from attattr_fast import engine, results
from attattr_fast.api import AttentionAttribution
from attattr_fast.datasets import Example, label_index
from attattr_fast.distributed import DistContext, assign
from attattr_fast.errors import AttAttrError, NonFiniteScores
from attattr_fast.inputs import as_dtype, check_options
from attattr_fast.results import Record
from attattr_fast.text import PADDED_FIELDS, Tokenized, model_max_length, tokenize

log = logging.getLogger(__name__)

SHARD_BYTES = 256 << 20  # a shard is held in memory until it is written; this bounds it for long inputs
MAX_EXAMPLES_PER_CALL = 1024
FINGERPRINT_ENTRIES = 1 << 22  # padded entries hashed at a time (32 MiB of int64)
MANIFEST_INTERVAL_S = 10.0  # rank 0 refreshes manifest.json at most this often while running
OUT_OF_MEMORY = engine.OUT_OF_MEMORY
DTYPE_NAMES = {None: "float32", torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass
class PreparedCorpus:
    examples: list[Example]
    tokenized: Tokenized  # unpadded: each engine call pads its own examples
    gold: list[int | None]  # class index of each example's label
    lengths: list[int] = field(init=False)  # real tokens of each example

    def __post_init__(self):
        self.lengths = self.tokenized.lengths


def prepare(aa: AttentionAttribution, tokenizer, examples: list[Example], truncate: bool = True) -> PreparedCorpus:
    """Tokenise and check every example up front, so bad input fails before anything is written."""
    adapter = aa.adapter
    config = adapter.config
    label2id = dict(getattr(config, "label2id", {}) or {})
    classes = adapter.num_labels  # read from the head: once, not per example
    gold = [None if e.label is None else label_index(e.label, label2id, classes) for e in examples]
    tokenized = tokenize(tokenizer, [e.text for e in examples], [e.text_pair for e in examples],
                         max_length=model_max_length(tokenizer, adapter.max_length), truncate=truncate)
    return PreparedCorpus(examples, tokenized, gold)


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


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the model's class and every parameter and buffer (names, shapes, dtypes, bytes)."""
    digest = hashlib.sha256(type(model).__name__.encode())
    for name, value in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype};".encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def config_fingerprint(config) -> str:
    """sha256 of the model config's settings (activation, epsilon, label names, …), not where it was loaded from
    or which transformers version wrote it."""
    settings = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def encoded_fingerprint(tokenized: Tokenized) -> str:
    """sha256 of the token ids, masks and segments as the model sees them, tokenizer and truncation included:
    each as one int64 tensor [N, longest], the digest results directories have always recorded (so a run
    resumes across versions), hashed a few million entries at a time rather than padded all at once."""
    count, longest = len(tokenized.tokens), max(tokenized.lengths)
    step = max(1, FINGERPRINT_ENTRIES // longest)
    digest = hashlib.sha256()
    for name in PADDED_FIELDS:  # each tensor whole, one after the other
        digest.update(str((count, longest)).encode())
        for begin in range(0, count, step):
            chunk = list(range(begin, min(begin + step, count)))
            digest.update(tokenized.padded(chunk, longest, fields=(name,))[0].numpy())
    return digest.hexdigest()


def plan_shards(lengths: list[int], shard_size: int, bytes_per_example: Callable[[int], int] | None = None,
                max_shard_bytes: int | None = None) -> list[list[int]]:
    """Example indices of every shard: all examples sorted by length (stable), cut every `shard_size` examples
    or earlier when the shard's stored bytes would pass `max_shard_bytes` (a shard has at least one example)."""
    if shard_size < 1:
        raise AttAttrError(f"shard size must be a positive integer, got {shard_size}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    shards: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i in order:
        cost = bytes_per_example(lengths[i]) if bytes_per_example else 0
        if current and (len(current) >= shard_size or (max_shard_bytes and size + cost > max_shard_bytes)):
            shards.append(current)
            current, size = [], 0
        current.append(i)
        size += cost
    if current:
        shards.append(current)
    return shards


class ChunkPlanner:
    """How much work one engine call gets at length n: rows per chunk and examples per call.

    Rows per chunk come from the engine's activation estimate within the memory budget; examples per call
    are as many as fill one chunk, also bounded by the call's output tensors (a quarter of the budget) and
    by `batch_size`. `shrink` halves everything after an out-of-memory error.
    """

    def __init__(self, aa: AttentionAttribution, layers: list[int], n_nodes: int, full: bool,
                 dtype: torch.dtype | None = None, budget: int | None = None, batch_size: int | None = None):
        adapter = aa.adapter
        self.adapter = adapter
        self.layers = layers
        self.n_nodes = n_nodes
        self.n_layers = len(layers)
        self.rows_per_example = len(layers) * n_nodes
        self.full = full
        self.dtype = dtype or torch.float32
        # Measured once: on CUDA free memory shrinks as the caching allocator keeps blocks, which says
        # nothing about what the next call can have.
        self.budget = int(budget) if budget is not None else engine.memory_budget(adapter.device)
        self.batch_size = batch_size
        self.scale = 1.0

    def rows(self, n: int) -> int:
        base = engine.default_rows_per_chunk(self.adapter, n, self.layers, self.n_nodes, self.dtype,
                                             self.adapter.device, budget=self.budget)  # fmt: skip
        return max(1, int(base * self.scale))

    def output_bytes(self, n: int) -> int:
        """The result tensors of one example padded to n (float32, on the device before the copy out)."""
        per = self.n_layers * n * n * (1 + (2 * self.adapter.n_heads if self.full else 0))
        return 4 * per + 64 * self.n_layers * self.adapter.n_heads

    def examples(self, n: int) -> int:
        cap = min(MAX_EXAMPLES_PER_CALL, max(1, (self.budget // 4) // self.output_bytes(n)))
        if self.batch_size is not None:
            cap = min(cap, self.batch_size)
        return max(1, min(self.rows(n) // self.rows_per_example, int(cap * self.scale)))

    def shrink(self, n: int, batch_len: int, rows_in_chunk: int | None = None) -> bool:
        """After an out-of-memory error: half the rows (and examples) the failed chunk held (`rows_in_chunk`,
        which `attribute` puts on the error; without it, what the call could have held at most), which can be
        fewer than `rows(n)` when the batch or its group was short; False when one row of one example failed."""
        used = min(self.rows(n), batch_len * self.rows_per_example, rows_in_chunk or self.rows(n))
        if used <= 1 and batch_len <= 1:
            return False
        self.scale *= used / (2 * self.rows(n))
        return True


def _records(res, batch: list[int], corpus: PreparedCorpus, lengths: list[int], id2label: dict,
             own_memory: bool) -> list[Record]:
    """The batch's records: slices of its result tensors, or (own_memory) copies, which let the batch go."""
    out = []
    for b, i in enumerate(batch):
        m = lengths[i]
        example = corpus.examples[i]
        t = int(res.target[b])
        record = Record(
            index=i,
            tokens=corpus.tokenized.tokens[i],
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
        out.append(results.compact(record) if own_memory else record)
    return out


@dataclass
class _Counters:
    oom_retries: int = 0


def iter_batches(aa: AttentionAttribution, corpus: PreparedCorpus, indices: list[int], targets: list[int | None],
                 planner: ChunkPlanner, top_k: int = 5, counters: _Counters | None = None, own_memory: bool = True,
                 **options) -> Iterator[list[Record]]:
    """Records of `indices`, one list per engine call, in the order given (sorted by length pads least); with
    `own_memory` False, slices of the call's result tensors (which they keep alive) rather than copies.

    A CUDA out-of-memory error shrinks `planner` and retries the same examples; AttAttrError when even one
    row of one example does not fit.
    """
    lengths = corpus.lengths
    id2label = dict(getattr(aa.adapter.config, "id2label", {}) or {})
    pos = 0
    while pos < len(indices):
        batch = [indices[pos]]
        n = lengths[indices[pos]]
        while pos + len(batch) < len(indices):
            longer = max(n, lengths[indices[pos + len(batch)]])
            if len(batch) + 1 > planner.examples(longer):
                break
            batch.append(indices[pos + len(batch)])
            n = longer
        batch_targets = [targets[i] for i in batch]
        # resolve_targets gives every example a class or none; a mix cannot occur
        target = torch.tensor(batch_targets, dtype=torch.long) if batch_targets[0] is not None else None
        rows = planner.rows(n)
        try:
            res = aa.attribute(*corpus.tokenized.padded(batch, n), target=target, top_k=top_k,
                               internal_batch_size=rows, **options)
        except OUT_OF_MEMORY as exc:
            res, failed_rows = None, getattr(exc, "rows_in_chunk", None)
        except NonFiniteScores as exc:  # named by its input position, not its place in the length-sorted batch
            raise exc.renamed(f"example {batch[exc.position]}") from None
        if res is None:  # outside the handler, so the failed call's tensors are already freed
            if not planner.shrink(n, len(batch), failed_rows):
                raise AttAttrError(f"out of memory on example {batch[0]} ({n} tokens) even with one row per chunk; "
                                   "target fewer --layers, use --output reduced, or a device with more memory")
            if counters is not None:
                counters.oom_retries += 1
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            log.warning("out of memory with %d examples of %d tokens, %d rows per chunk; retrying with %d rows",
                        len(batch), n, rows, planner.rows(n))
            continue
        records = _records(res, batch, corpus, lengths, id2label, own_memory)
        del res  # the batch tensors go now, not when the caller asks for the next batch
        pos += len(batch)
        yield records


def _planner(aa: AttentionAttribution, options: dict[str, Any], top_k: int, memory_budget: int | None,
             batch_size: int | None) -> tuple[ChunkPlanner, list[int]]:
    method = options.get("method", "riemann_right")
    n_steps = options.get("n_steps", 20)
    output = options.get("output", "full")
    alphas, _ = check_options(method, n_steps, output, options.get("dtype"), None, top_k)
    if options.get("dtype") is not None:  # a name, as `attribute` takes it, becomes the dtype for every later use
        options["dtype"] = as_dtype(options["dtype"])
    layers = options.get("layers")
    layers = list(range(aa.adapter.n_layers)) if layers is None else list(layers)
    if memory_budget is not None and memory_budget < 1:
        raise AttAttrError(f"memory budget must be positive, got {memory_budget}")
    planner = ChunkPlanner(aa, layers, len(alphas), output == "full", options.get("dtype"), memory_budget, batch_size)
    return planner, layers


def attribute_corpus(
    aa: AttentionAttribution,
    corpus: PreparedCorpus,
    targets: list[int | None],
    batch_size: int | None = None,
    top_k: int = 5,
    progress: bool = True,
    memory_budget: int | None = None,
    **options,
) -> Iterator[Record]:
    """Records of every example, shortest first, nothing written; `options` go to `attribute`.

    Args:
        batch_size: most examples per engine call (None: as many as the memory budget allows).
        memory_budget: bytes for one call's rows (None: half the free CUDA memory, 1 GiB on the CPU).
    """
    from tqdm.auto import tqdm

    planner, _ = _planner(aa, options, top_k, memory_budget, batch_size)
    order = sorted(range(len(corpus.examples)), key=lambda i: corpus.lengths[i])
    with tqdm(total=len(order), unit="ex", disable=not progress, desc="attributing", dynamic_ncols=True) as bar:
        for records in iter_batches(aa, corpus, order, targets, planner, top_k, **options):
            yield from records
            bar.update(len(records))


def release_freed_memory() -> None:
    """Hand memory freed by finished batches back to the OS (glibc's malloc_trim; elsewhere nothing).

    glibc keeps freed heap memory for reuse, and the ever-changing tensor sizes of a length-sorted run leave it
    fragmented: without this the resident set of a 10,000-example run creeps up by hundreds of MiB although
    nothing is kept alive.
    """
    global _malloc_trim
    if _malloc_trim is None:
        _malloc_trim = False
        if sys.platform.startswith("linux"):
            try:
                _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
            except (OSError, AttributeError):  # not glibc (e.g. musl)
                pass
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


@dataclass
class CorpusStats:
    """What a run did (on one rank, or summed over ranks by `run_corpus` on rank 0)."""

    examples: int  # attributed in this run
    tokens: int
    seconds: float
    shards: int  # written in this run
    skipped: int  # examples already done before this run
    total: int  # examples in the input
    oom_retries: int = 0
    processes: int = 1
    write_wait_seconds: float = 0.0  # waiting for shard writes to finish (the slowest rank's, on rank 0)

    def summary(self) -> str:
        """One line: throughput and what was resumed."""
        if self.examples == 0:
            return f"nothing to do: all {self.total} examples were already done"
        rate = self.examples / max(self.seconds, 1e-9)
        text = (f"attributed {self.examples} examples ({self.tokens} tokens) in {self.seconds:.1f} s with "
                f"{self.processes} process{'es' if self.processes > 1 else ''}: {rate:.1f} examples/s, "
                f"{self.tokens / max(self.seconds, 1e-9):.0f} tokens/s; {self.shards} shards written")  # fmt: skip
        if self.skipped:
            text += f", {self.skipped} examples already done"
        if self.oom_retries:
            text += f", {self.oom_retries} out-of-memory retries"
        if self.write_wait_seconds >= 0.1:  # the engine waited for the disk (or the host) this long
            text += f"; {self.write_wait_seconds:.1f} s waiting for shard writes"
        return text


def describe_model(name: str, model: torch.nn.Module, tokenizer) -> dict[str, Any]:
    """The manifest's model entry: the name given, the sha256 of the weights and of the config (what a resume
    compares), the number of encoder layers and the tokenizer's separator token (what the graph needs)."""
    return {"name": name, "class": type(model).__name__, "sha256": model_fingerprint(model),
            "config_sha256": config_fingerprint(model.config), "n_layers": int(model.config.num_hidden_layers),
            "sep_token": tokenizer.sep_token}


def describe_input(source: dict[str, Any], corpus: PreparedCorpus) -> dict[str, Any]:
    """The manifest's input entry: `source` (file path and sha256, or --text count) plus the encoding's sha256."""
    return {**source, "n_examples": len(corpus.examples), "encoded_sha256": encoded_fingerprint(corpus.tokenized)}


class BackgroundWrites:
    """Shards written on a background thread while the engine computes the next one. On a GPU the process
    mostly waits for the device, and writing a shard (float16 encoding, serialising, checksums, the file
    writes) would otherwise add its time to every shard's. At most one shard is pending, so memory holds at
    most two shards' records."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="attattr-write")
        self._pending: Future | None = None
        self.wait_seconds = 0.0  # the caller's time spent waiting for writes

    def submit(self, write: Callable[..., dict[str, Any]], *args) -> list[dict[str, Any]]:
        """Queues `write(*args)` behind the pending write, then waits for that one; returns its commit (its error
        is raised here). Queued first, so an interrupt during the wait still writes the new shard (`close`)."""
        pending, self._pending = self._pending, self._pool.submit(write, *args)
        return self._wait(pending)

    def drain(self) -> list[dict[str, Any]]:
        """Waits for the pending write; its commit (an error of the write is raised here)."""
        pending, self._pending = self._pending, None
        return self._wait(pending)

    def _wait(self, pending: Future | None) -> list[dict[str, Any]]:
        if pending is None:
            return []
        start = time.perf_counter()
        try:
            return [pending.result()]
        finally:
            self.wait_seconds += time.perf_counter() - start

    def close(self) -> None:
        """Lets a pending write finish, then stops the thread."""
        self._pool.shutdown(wait=True)


def run_corpus(
    aa: AttentionAttribution,
    corpus: PreparedCorpus,
    targets: list[int | None],
    directory: str | Path,
    meta: dict[str, Any],
    *,
    shard_size: int = 256,
    store_dtype: torch.dtype = torch.float32,
    top_k: int = 5,
    repair: bool = False,
    progress: bool = True,
    batch_size: int | None = None,
    memory_budget: int | None = None,
    dist: DistContext | None = None,
    on_records: Callable[[list[Record]], None] | None = None,
    **options,
) -> CorpusStats:
    """Attribute a corpus into a resumable results directory; under torchrun each rank does its share.

    Args:
        directory: results directory; new or empty, or one this same run wrote before (it then continues,
            never recomputing a finished shard).
        meta: "model" (`describe_model`) and "input" (`describe_input`) identify the run together with the
            settings taken from `options`; any other keys (e.g. "target", "labels") go to the manifest as they are.
        shard_size: examples per shard.
        store_dtype: dtype of the stored [.., n, n] tensors (float32 or float16).
        top_k: strongest interactions of each layer matrix kept per record.
        repair: recompute damaged shards instead of refusing to continue.
        batch_size, memory_budget: see `attribute_corpus`.
        dist: this process's place in a multi-process run (None: a single process).
        on_records: called with each engine call's records as they are computed.
        options: `AttentionAttribution.attribute` options (layers, n_steps, method, output, dtype, backend).

    Returns:
        CorpusStats of this run (summed over ranks on rank 0).
    """
    from tqdm.auto import tqdm

    dist = dist or DistContext()
    if store_dtype not in (torch.float32, torch.float16):
        raise AttAttrError(f"store dtype must be float32 or float16, got {store_dtype}")
    if "model" not in meta or "input" not in meta:
        raise AttAttrError("run_corpus: meta needs 'model' and 'input' (see describe_model, describe_input)")
    planner, layers = _planner(aa, options, top_k, memory_budget, batch_size)
    lengths = corpus.lengths
    full = options.get("output", "full") == "full"
    n_heads = aa.adapter.n_heads
    plan = plan_shards(lengths, shard_size,
                       lambda n: results.record_bytes(n, len(layers), n_heads, full),
                       SHARD_BYTES)  # fmt: skip
    targets_sha256 = hashlib.sha256(json.dumps([None if t is None else int(t) for t in targets]).encode()).hexdigest()
    meta = {**meta, "method": options.get("method", "riemann_right"), "n_steps": options.get("n_steps", 20),
            "dtype": DTYPE_NAMES.get(options.get("dtype"), str(options.get("dtype"))), "layers": layers,
            "output": options.get("output", "full"), "top_k": top_k, "store_dtype": DTYPE_NAMES[store_dtype],
            "shard_size": shard_size, "shard_bytes": SHARD_BYTES, "targets_sha256": targets_sha256}  # fmt: skip
    directory = Path(directory)

    lock = None
    if dist.is_main:
        try:
            commits, lock = results.open_run_directory(directory, meta, plan, repair)
            verdict: tuple[str, Any] = ("ok", sorted(commits))
        except AttAttrError as exc:
            verdict = ("error", str(exc))
    else:
        commits, verdict = {}, ("", None)
    verdict = dist.broadcast(verdict)  # every rank raises the same error, or agrees on what is done
    if verdict[0] == "error":
        raise AttAttrError(verdict[1])
    done = set(verdict[1])
    todo = [p for p in range(len(plan)) if results.shard_name(p) not in done]
    hidden = aa.adapter.hidden_size
    costs = [sum(lengths[i] * (lengths[i] + 6 * hidden) for i in plan[p]) for p in todo]
    mine = [todo[k] for k in assign(costs, dist.world_size)[dist.rank]]
    skipped = len(corpus.examples) - sum(len(plan[p]) for p in todo)
    if skipped:
        log.info("resuming %s: %d of %d examples already done, %d shards to go", directory, skipped,
                 len(corpus.examples), len(todo))

    counters = _Counters()
    n_done = tokens = 0
    start = time.perf_counter()
    last_manifest = time.monotonic()
    desc = "attributing" if dist.world_size == 1 else f"attributing (rank 0 of {dist.world_size})"
    bar = tqdm(total=sum(len(plan[p]) for p in mine), unit="ex", desc=desc, dynamic_ncols=True,
               disable=not progress or not dist.is_main)  # fmt: skip

    def written(commit: dict[str, Any]) -> None:
        nonlocal n_done, tokens, commits, last_manifest
        n_done += commit["n"]
        tokens += sum(lengths[i] for i in commit["indices"])
        release_freed_memory()
        if dist.is_main:
            commits[commit["name"]] = commit
            if time.monotonic() - last_manifest >= MANIFEST_INTERVAL_S:
                if dist.world_size > 1:
                    commits = results.read_commits(directory)[0]  # the other ranks' shards too
                results.write_manifest(directory, meta, plan, commits, complete=False)
                last_manifest = time.monotonic()

    writes = BackgroundWrites()
    try:
        for p in mine:
            shard: list[Record] = []
            # slices, not copies: writing a shard copies what it stores anyway, on the writer's thread, and a copy
            # here would take the engine's thread 0.3–0.4 ms per full BERT-base record (on the development CPU)
            for records in iter_batches(aa, corpus, plan[p], targets, planner, top_k, counters, own_memory=False,
                                        **options):  # fmt: skip
                shard.extend(records)
                bar.update(len(records))
                if on_records is not None:
                    on_records(records)
            for commit in writes.submit(results.write_shard, directory, results.shard_name(p), shard, store_dtype,
                                        dist.rank):  # fmt: skip
                written(commit)
            del shard
        for commit in writes.drain():
            written(commit)
        bar.close()
        seconds = time.perf_counter() - start
        dist.barrier()  # every rank's commits are on disk before rank 0 merges them
        if dist.is_main:
            commits, problems = results.read_commits(directory)
            for name, why in problems.items():
                log.warning("%s: %s", name, why)
            complete = all(results.shard_name(p) in commits for p in range(len(plan)))
            results.write_manifest(directory, meta, plan, commits, complete=complete)
    finally:
        try:
            writes.close()  # a shard already computed is still written, so a rerun keeps it
        finally:  # even when a second interrupt ends the wait
            bar.close()
            if lock is not None:
                lock.release()
    mine_stats = CorpusStats(n_done, tokens, seconds, len(mine), skipped, len(corpus.examples),
                             counters.oom_retries, dist.world_size, writes.wait_seconds)  # fmt: skip
    gathered = dist.gather(mine_stats)
    if not dist.is_main:
        return mine_stats
    return CorpusStats(
        examples=sum(s.examples for s in gathered),
        tokens=sum(s.tokens for s in gathered),
        seconds=max(s.seconds for s in gathered),
        shards=sum(s.shards for s in gathered),
        skipped=skipped,
        total=len(corpus.examples),
        oom_retries=sum(s.oom_retries for s in gathered),
        processes=dist.world_size,
        write_wait_seconds=max(s.write_wait_seconds for s in gathered),
    )
