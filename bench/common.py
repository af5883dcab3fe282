"""What every benchmark here shares: the environment record, timing, memory, FLOPs, tables and JSON.

Timing: warm-up calls first, then repeated calls, each bracketed by a CUDA synchronisation on a GPU;
the median is reported and every repeat is kept. Peak memory: `torch.cuda.max_memory_allocated` on a
GPU; on the CPU the growth of the process's resident set over the call, sampled every 5 ms.
"""

from __future__ import annotations

import datetime
import inspect
import json
import os
import platform
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from attattr_fast import engine

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Dense (no sparsity) tensor-core peaks from NVIDIA's data sheets, TFLOP/s, keyed by a substring of
# torch.cuda.get_device_name(); the first match wins, so the more specific names come first.
PEAK_TFLOPS = (
    ("H100 PCIe", {"bf16": 756.0, "tf32": 378.0}),
    ("H100 NVL", {"bf16": 835.5, "tf32": 417.5}),
    ("H100", {"bf16": 989.4, "tf32": 494.7}),  # SXM5 (reported as "H100 80GB HBM3")
    ("H200 NVL", {"bf16": 835.5, "tf32": 417.5}),
    ("H200", {"bf16": 989.4, "tf32": 494.7}),
)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads)"


def device_slug(device: torch.device) -> str:
    """A short file-name-safe device tag: "cpu", "h100", "h200", or the GPU name."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    for tag in ("h200", "h100", "a100", "l40s", "l4"):
        if tag in name:
            return tag
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def peak_tflops(device: torch.device, dtype: torch.dtype) -> tuple[float | None, str]:
    """(the device's peak for this dtype's matmuls in TFLOP/s, which peak) or (None, reason)."""
    if device.type != "cuda":
        return None, "n/a on CPU"
    kind = "bf16" if dtype in (torch.bfloat16, torch.float16) else "tf32"
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS:
        if key in name:
            note = ""
            if kind == "tf32" and torch.get_float32_matmul_precision() == "highest":
                note = " (float32 matmuls ran in full FP32: float32_matmul_precision is 'highest')"
            return peaks[kind], f"{key} {kind} dense{note}"
    return None, f"no known peak for {name}"


def git_revision() -> dict:
    """Commit and whether the working tree differs from it (read-only git commands)."""

    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return ""
        return done.stdout.rstrip() if done.returncode == 0 else ""  # keep the porcelain's leading column

    changed = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD").strip() or "unknown", "dirty": bool(changed),
            "changed_files": [line[3:] for line in changed.splitlines()]}


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "numpy", "captum", "triton", "attattr_fast", "pytest_benchmark"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "installed")
        except ImportError:
            out[name] = None
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
        out["cudnn"] = torch.backends.cudnn.version()
    return out


def environment(device: torch.device) -> dict:
    """Everything about where and on what a benchmark ran."""
    env = {
        "device": device_name(device),
        "device_type": device.type,
        "host_cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "versions": versions(),
        "git": git_revision(),
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "omp_env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "TRITON_INTERPRET")},
    }
    if device.type == "cuda":
        env["cuda_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    try:
        env["load_average"] = os.getloadavg()
    except OSError:
        pass
    return env


def load_warning(device: torch.device) -> str | None:
    """A warning when other processes compete for the CPU cores (timings are then noisy, and torch's
    multi-threaded ops can be several times slower than single-threaded ones)."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    cores = os.cpu_count() or 1
    if load > 0.75 * cores and device.type == "cpu":
        return (f"warning: load average {load:.1f} on {cores} cores: other processes compete for the CPU; "
                f"timings are noisy; OpenMP threads that spin-wait on busy cores slow torch down several "
                f"times: run with OMP_WAIT_POLICY=PASSIVE in the environment, or --threads 1")
    return None


def set_threads(requested: int | None, device: torch.device) -> str | None:
    """Apply --threads. Left unset on a CPU whose cores are already busy, use one thread: torch's OpenMP
    threads spin-wait for each other, and when another process holds a core every small op waits for a
    descheduled thread (in our runs the literal loop was up to 16x slower with 2 threads than with 1). Returns a
    note for the log, or None."""
    if requested:
        torch.set_num_threads(requested)
        return None
    if device.type == "cpu" and load_warning(device) and torch.get_num_threads() > 1:
        torch.set_num_threads(1)
        return "the CPU is busy: using 1 torch thread (pass --threads N to override)"
    return None


def pick_device(requested: str | None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _RssSampler:
    """Peak resident-set growth of this process while running (CPU peak memory)."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.start = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def _release_free_memory() -> None:
    """Return freed heap pages to the system (glibc), so that RSS growth measures this call's memory."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_bytes() -> int:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@dataclass
class Timing:
    """Seconds per call (median of `times`) and the peak memory of the timed calls in MiB."""

    seconds: float
    times: list[float]
    peak_mib: float | None
    memory_kind: str
    result: object = field(default=None, repr=False)

    def as_dict(self) -> dict:
        return {"seconds": self.seconds, "times": self.times, "peak_mib": self.peak_mib,
                "memory_kind": self.memory_kind}


def measure(fn: Callable[[], object], device: torch.device, repeats: int = 3, warmup: int = 1,
            warmup_fn: Callable[[], object] | None = None) -> Timing:
    """Time `fn()`: `warmup` calls of `warmup_fn` (default `fn`) first, then `repeats` timed calls.

    Returns the median time, all times, the peak memory of the timed calls and the last call's result.
    """
    for _ in range(warmup):
        (warmup_fn or fn)()
    synchronize(device)
    times, result = [], None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        for _ in range(repeats):
            result = None  # the previous call's output is not part of this call's peak
            synchronize(device)
            t0 = time.perf_counter()
            result = fn()
            synchronize(device)
            times.append(time.perf_counter() - t0)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        kind = "cuda max_memory_allocated above the starting allocation"
    else:
        _release_free_memory()
        with _RssSampler() as rss:
            for _ in range(repeats):
                result = None
                t0 = time.perf_counter()
                result = fn()
                times.append(time.perf_counter() - t0)
        peak = (rss.peak - rss.start) / 2**20
        kind = "growth of the process RSS over the call (after malloc_trim), sampled every 5 ms"
    return Timing(statistics.median(times), times, peak, kind, result)


def tensor_peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """The peak of tensor memory torch held during fn() above what it held before: CUDA,
    `max_memory_allocated`; CPU, the profiler's memory timeline (every tensor torch created and had not yet
    freed; slow: for a few rows, not for timing)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    live = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:  # private, the source of export_memory_timeline
        live += {"CREATE": size, "DESTROY": -size}.get(action.name, 0)
        peak = max(peak, live)
    return peak


# -- the cost model of DESIGN §2 ----------------------------------------------------------------
def layer_flops(n: int, hidden: int, intermediate: int) -> float:
    """Forward FLOPs of one encoder layer at length n: Q, K, V and output projections, QKᵀ and AV,
    and the feed-forward (2 FLOPs per multiply-add; softmax, LayerNorm and biases left out)."""
    projections = 2 * n * hidden * 4 * hidden
    attention = 2 * 2 * n * n * hidden
    feed_forward = 2 * 2 * n * hidden * intermediate
    return float(projections + attention + feed_forward)


def engine_flops(n: int, n_layers: int, n_nodes: int, hidden: int, intermediate: int,
                 layers: list[int] | None = None) -> float:
    """DESIGN §2 for the engine: 2·K·Σ_l (L − l + 1)·C_layer(n) for K nodes (forward and input-only
    backward of the layers from l up; l 1-based), plus the one forward of the real input. `layers`
    are the 0-based target layers (None: all); the top-layer shortcut is not subtracted."""
    c = layer_flops(n, hidden, intermediate)
    layers = range(n_layers) if layers is None else layers
    return 2 * n_nodes * sum(n_layers - layer for layer in layers) * c + n_layers * c


def loop_flops(n: int, n_layers: int, n_steps: int, hidden: int, intermediate: int,
               layers: list[int] | None = None) -> float:
    """DESIGN §2 for the literal loop: m·Σ_l (L + (L − l + 1))·C_layer(n): a whole forward and the
    backward down to layer l for every node (l 1-based; `layers` 0-based, None: all)."""
    c = layer_flops(n, hidden, intermediate)
    layers = range(n_layers) if layers is None else layers
    return n_steps * sum(n_layers + (n_layers - layer) for layer in layers) * c


# -- accuracy ------------------------------------------------------------------------------------
def relative_error(values, reference) -> float:
    """Worst layer's max |values − reference| / max |reference|; both [..., L', H, n, n] (or lists of
    [L', H, n_b, n_b] per example, compared example by example)."""
    if isinstance(values, torch.Tensor):
        values, reference = [values], [reference]
    worst = 0.0
    n_layers = reference[0].shape[-4]
    for li in range(n_layers):
        diff = max(float((v[..., li, :, :, :].double() - r[..., li, :, :, :].double()).abs().max())
                   for v, r in zip(values, reference))
        scale = max(float(r[..., li, :, :, :].abs().max()) for r in reference)
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


# -- output ----------------------------------------------------------------------------------------
def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A plain-text table; columns are (key, header, format spec); None prints as "-"."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        line = []
        for key, _, spec in columns:
            value = row.get(key)
            if value is None:
                line.append("-")
            elif isinstance(value, str):
                line.append(value)
            else:
                line.append(format(value, spec))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    out = []
    for j, r in enumerate(cells):
        out.append("  ".join(c.rjust(w) if j and i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _jsonable(value):
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, torch.device):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and value != value:
        return None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json(payload: dict, name: str, device: torch.device, out_dir: Path | None = None) -> Path:
    """Write `payload` to <out_dir>/<device slug>-<name>.json (atomically) and return the path."""
    out_dir = Path(out_dir or RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{device_slug(device)}-{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def random_bert(layers: int = 12, heads: int = 12, hidden: int = 768, intermediate: int = 3072,
                num_labels: int = 2, seed: int = 0, device: torch.device | str = "cpu",
                vocab_size: int = 30522, max_positions: int = 512):
    """A BertForSequenceClassification with random weights (BERT-base shape by default), eval mode,
    parameters frozen."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=heads, intermediate_size=intermediate,
                                     num_labels=num_labels, max_position_embeddings=max_positions)
    model = transformers.BertForSequenceClassification(config).eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def random_batch(lengths: list[int], vocab_size: int, seed: int = 1, pair_first: list[int] | None = None,
                 pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, token_type_ids) right-padded to max(lengths): [CLS] … [SEP] with
    random tokens in between; with `pair_first`, segment 1 starts after that many tokens (the second
    [SEP] ends it)."""
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.full((len(lengths), n), pad_id, dtype=torch.long)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    types = torch.zeros(len(lengths), n, dtype=torch.long)
    cls_id, sep_id = 101 % vocab_size, 102 % vocab_size
    for b, m in enumerate(lengths):
        ids[b, :m] = torch.randint(1000 % vocab_size, vocab_size, (m,), generator=g)
        ids[b, 0], ids[b, m - 1] = cls_id, sep_id
        mask[b, :m] = 1
        if pair_first is not None:
            first = pair_first[b]
            ids[b, first - 1] = sep_id
            types[b, first:m] = 1
    return ids, mask, types


class GroupLog:
    """Records the groups `engine.attribute_group` runs: (examples, padded length, rows per chunk, real tokens), and
    whether each ran packed."""

    def __init__(self):
        self.groups: list[tuple[int, int, int, torch.Tensor]] = []  # a real-token count on the device stays there
        self.packed: list[bool] = []  # whether the group's rows ran packed (engine.attribute_group's rule)
        self._real = engine.attribute_group

    def __enter__(self):
        """Starts a new record (a log entered once per call keeps the last call's groups)."""
        self.groups.clear()
        self.packed.clear()

        def spy(*args, **kwargs):
            call = inspect.signature(self._real).bind(*args, **kwargs).arguments
            ids, lengths = call["input_ids"], call.get("lengths")
            real = call["key_mask"].sum() if lengths is None else lengths.sum()
            self.groups.append((ids.shape[0], ids.shape[1], call["rows_per_chunk"], real))
            functions = call.get("functions", engine.EAGER)
            self.packed.append(engine.runs_packed(lengths, ids.shape[1], functions))
            return self._real(*args, **kwargs)

        engine.attribute_group = spy
        return self

    def __exit__(self, *exc):
        engine.attribute_group = self._real

    def summary(self, rows_per_example: int) -> dict:
        padded = sum(b * n for b, n, _, _ in self.groups)
        real = sum(int(t) for *_, t in self.groups)
        return {"groups": [list(g[:3]) for g in self.groups], "packed": self.packed,
                "padding_fraction": padded / real - 1,
                "row_tokens_per_group_mean": rows_per_example * padded / len(self.groups)}

    @staticmethod
    def describe(plan: dict) -> str:
        """One line for a `summary`: groups, how many ran packed, padding."""
        return (f"{len(plan['groups'])} groups ({sum(plan['packed'])} packed), "
                f"padding {100 * plan['padding_fraction']:.0f}%")
