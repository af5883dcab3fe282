"""The fast engine: every layer and quadrature node of a group of examples in one batched backward.

DESIGN §2. For target layer l and node α the attention output of layer l is α·ctx^l, where ctx^l = A^l V^l
comes from one forward of the real input (prefix reuse: nothing below l depends on α). A *row* is one
(example, target layer, node); it starts at layer l's attention output with the leaf c = α·ctx^l and runs
the layers above. Then ∂F/∂A_h = G_h V_hᵀ with G = ∂F/∂c, so only the [H, n, d] context gradient is
kept per row, and Ḡ = Σ_k w_k G_k gives Attr = A ⊙ (Ḡ Vᵀ) (`reductions`).

Rows of all target layers share one forward: at layer l the rows that started lower run the whole
layer, the rows that start at l join after its attention. With a head that reads position 0 only,
the top layer computes queries, attention, output projection and feed-forward for position 0 only.
Parameters never require grad; the backward stops at the leaves.

Rows are padded to their group's longest example. Where that padding is large (`PACK_ABOVE_PADDING`), the rows'
hidden states hold only the real tokens (`TokenLayout`): the linear layers, LayerNorms and activations run on
those, and each layer pads its input only for the Q/K/V product and the attention.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from attattr_fast import reductions
from attattr_fast.adapters import EncoderAdapter, LayerWeights, Weights
from attattr_fast.errors import AttAttrError

log = logging.getLogger(__name__)

# What the CUDA caching allocator raises when a chunk does not fit (torch.OutOfMemoryError from torch 2.5;
# before, torch.cuda.OutOfMemoryError). Other allocation failures (a CPU one is a RuntimeError) are not retried.
OUT_OF_MEMORY = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),)

# Instrumentation (bench/profile_engine.py --phases): None, or a function that takes a phase's name and returns the
# context manager to run it under. The phases of a call, in the engine and (collect) the api; they do not nest.
PHASES = ("prefix", "gather", "rows forward", "rows backward", "accumulate", "baseline", "reduce", "collect")
phase_hook: Callable[[str], contextlib.AbstractContextManager] | None = None


def phase(name: str) -> contextlib.AbstractContextManager:
    """The context to run the named phase under: `phase_hook`'s, or none."""
    assert name in PHASES, name
    return contextlib.nullcontext() if phase_hook is None else phase_hook(name)


@dataclass
class LayerState:
    """What the real-input forward leaves for one target layer (batch of B examples, length n)."""

    hidden_in: Tensor  # X^l [B, n, D], the layer's input (the residual of its attention output)
    context: Tensor  # A V [B, H, n, d], before head gates
    values: Tensor  # V [B, H, n, d]
    probs: Tensor | None  # A [B, H, n, n] (torch backend, or output="full")
    queries: Tensor | None  # Q [B, H, n, d] (triton backend)
    keys: Tensor | None  # K [B, H, n, d] (triton backend)
    lse: Tensor | None  # row log-sum-exp of the scores [B, H, n] (triton backend)
    scale: float | None = None  # softmax scale of the scores, to recompute them (triton backend)


@dataclass
class Prefix:
    layers: dict[int, LayerState]
    logits: Tensor  # [B, C] float32
    key_mask: Tensor  # [B, n] bool


def run_prefix(
    adapter: EncoderAdapter,
    weights: Weights,
    input_ids: Tensor,
    key_mask: Tensor,
    token_type_ids: Tensor | None,
    target_layers: list[int],
    keep_probs: bool,
    keep_qk: bool,
) -> Prefix:
    """One forward of the real input, keeping the states the rows start from."""
    with torch.no_grad():
        x = adapter.embed(input_ids, token_type_ids, key_mask, weights.dtype)
        bias = adapter.mask_bias(key_mask, weights.dtype)
        states: dict[int, LayerState] = {}
        for layer, lw in enumerate(weights.layers):
            q, k, v = adapter.project_qkv(lw, x)
            probs, lse = adapter.attention_probs(q, k, bias)
            context = probs @ v
            if layer in target_layers:
                states[layer] = LayerState(
                    hidden_in=x,
                    context=context,
                    values=v if keep_qk else v.contiguous(),  # else a view that keeps Q and K alive
                    probs=probs if keep_probs else None,
                    queries=q if keep_qk else None,
                    keys=k if keep_qk else None,
                    lse=lse if keep_qk else None,
                    scale=adapter.scale,
                )
            x = adapter.layer_output(lw, weights.layer_gates[layer], context, x)
        logits = adapter.classify(weights, x, key_mask).float()
    return Prefix(layers=states, logits=logits, key_mask=key_mask.bool())


@dataclass
class Rows:
    """A chunk of rows, sorted by start layer. All tensors are indexed by row."""

    start_layer: list[int]  # ascending (on the host: the forward branches on it)
    padded: bool  # some key is padding (a mask bias is needed)
    alpha: Tensor  # [R]
    hidden_in: Tensor  # [R, n, D]
    context: Tensor  # [R, H, n, d]
    key_mask: Tensor  # [R, n] bool
    target: Tensor  # long [R]
    layout: TokenLayout | None = None  # the real tokens, where the rows run packed


@dataclass
class TokenLayout:
    """Where the real tokens of a chunk's rows lie. Packed, the rows' states are [T, 1, D]: the T real tokens in
    row order, each as a row of one position, so the adapter's per-layer functions run on them unchanged.
    Attention needs the padded [rows, n] layout; the rows already running are always the first ones."""

    n: int  # the padded length
    offsets: list[int]  # R + 1, on the host: real tokens in the rows before each row
    index: Tensor  # long [T]: the padded position (row · n + i) of each real token

    @classmethod
    def of(cls, lengths: Tensor, n: int, device: torch.device) -> TokenLayout:
        """The layout of rows with these real lengths (a host tensor [R]): no read from the device."""
        offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        row = torch.arange(len(lengths)).repeat_interleave(lengths)
        position = torch.arange(int(offsets[-1])) - offsets[:-1].repeat_interleave(lengths)
        return cls(n, offsets.tolist(), (row * n + position).to(device, non_blocking=True))

    def pack(self, x: Tensor, begin: int, end: int) -> Tensor:
        """The real tokens [T', ...] of rows begin..end from their padded states x [end − begin, n, ...]."""
        index = self.index[self.offsets[begin] : self.offsets[end]]
        if begin:
            index = index - begin * self.n
        return x.reshape(-1, *x.shape[2:]).index_select(0, index)

    def pad(self, x: Tensor, rows: int) -> Tensor:
        """The first `rows` rows' padded states [rows, n, D] (zero at padding) from their packed x [T', 1, D]."""
        flat = x.new_zeros(rows * self.n, x.shape[-1])
        return flat.index_copy(0, self.index[: self.offsets[rows]], x.flatten(0, 1)).view(rows, self.n, -1)


def target_probability(logits: Tensor, target: Tensor) -> Tensor:
    """F: the softmax probability of the target class, float32 [R]. On the CPU and CUDA the softmax runs in
    float64: its gradient p_t(δ − p) needs 1 − p_t, which float32 gives only to eps/(1 − p_t) for a confident
    prediction (1e-5 relative at p_t = 0.994), an error the backward carries into every attribution. Devices
    without float64 (MPS, XPU, …) keep float32 and that error."""
    wide = torch.float64 if logits.device.type in ("cpu", "cuda") else torch.float32
    return torch.softmax(logits.to(wide), dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1).float()


def layer_from_context(adapter: EncoderAdapter, lw: LayerWeights, gate: Tensor | None, context: Tensor,
                       residual: Tensor) -> Tensor:
    """`adapter.layer_output` as a function of tensors (what `compiled_layer_functions` compiles)."""
    return adapter.layer_output(lw, gate, context, residual)


def full_layer(adapter: EncoderAdapter, lw: LayerWeights, gate: Tensor | None, x: Tensor,
               bias: Tensor | None) -> Tensor:
    """A whole layer on rows already running."""
    q, k, v = adapter.project_qkv(lw, x)
    return _attend(adapter, lw, gate, q, k, v, bias, x)


def top_layer(adapter: EncoderAdapter, lw: LayerWeights, gate: Tensor | None, x: Tensor,
              bias: Tensor | None) -> Tensor:
    """The top layer under a head that reads position 0: keys and values of all positions, the rest for
    position 0 only ([R, 1, D])."""
    k, v = adapter.project_kv(lw, x)
    x = x[:, :1]
    return _attend(adapter, lw, gate, adapter.project_q(lw, x), k, v, bias, x)


def _attend(adapter, lw, gate, q, k, v, bias, residual, layout: TokenLayout | None = None):
    """Attention and the rest of the layer; with `layout`, the context is packed to the residual's tokens."""
    context = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=adapter.scale)
    if layout is not None:
        context = _pack_heads(layout, context, 0, len(context))
    return adapter.layer_output(lw, gate, context, residual)


def packed_full_layer(adapter: EncoderAdapter, lw: LayerWeights, gate: Tensor | None, x: Tensor,
                      bias: Tensor | None, layout: TokenLayout, rows: int) -> Tensor:
    """`full_layer` on the packed states x [T', 1, D] of the layout's first `rows` rows: padded for the Q/K/V
    product and attention, packed for the rest."""
    q, k, v = adapter.project_qkv(lw, layout.pad(x, rows))
    return _attend(adapter, lw, gate, q, k, v, bias, x, layout)


def _pack_heads(layout: TokenLayout, context: Tensor, begin: int, end: int) -> Tensor:
    """[rows, H, n, d] → the real tokens as [T', H, 1, d] (what `attention_output` merges per position)."""
    return layout.pack(context.transpose(1, 2), begin, end).unsqueeze(2)


@dataclass(frozen=True)
class LayerFunctions:
    """What runs the layers above the target in the rows' forward and, through autograd, backward."""

    full: Callable = full_layer
    top: Callable = top_layer
    from_context: Callable = layer_from_context


EAGER = LayerFunctions()
_compiled: LayerFunctions | None = None


def compiled_layer_functions() -> LayerFunctions:
    """The row layers under `torch.compile`: inductor fuses the element-wise work around the products, forward
    and backward. The layer's weights are arguments, so one graph serves every layer. The row count and
    length are marked dynamic from the first call, so new chunk shapes reuse the graphs: one per variant
    (with and without a mask bias; the top layer's position-0 states; a block of one row). Only the rows'
    gradient pass uses them (`context_gradients`); a change of grad mode would compile again."""
    global _compiled
    if _compiled is None:
        _compiled = LayerFunctions(
            full=_compile_with_dynamic_rows(full_layer, {3: (0, 1), 4: (0, 3)}),
            top=_compile_with_dynamic_rows(top_layer, {3: (0, 1), 4: (0, 3)}),
            from_context=_compile_with_dynamic_rows(layer_from_context, {3: (0, 2), 4: (0, 1)}),
        )
    return _compiled


# Graphs one compiled layer function may build (dynamo's default, 8, is per function across the process):
# bias or none × one row or more × a one-row top block, and another model configuration builds its own.
RECOMPILE_LIMIT = 32


def _compile_with_dynamic_rows(fn: Callable, dynamic_dims: dict[int, tuple[int, ...]]) -> Callable:
    """torch.compile(fn), with the dims `dynamic_dims` names ({argument position: dims}) marked dynamic on
    every call (rows and positions; a dim of size 1 is specialised, as dynamo does). Those arguments are
    made contiguous from offset 0 first (a copy of a row slice of the prefix states), so differing strides
    and offsets do not add graphs."""
    compiled = torch.compile(fn)
    limit_key = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"  # < 2.6

    def call(*args):
        args = list(args)
        for position, dims in dynamic_dims.items():
            tensor = args[position]
            if tensor is None:
                continue
            if tensor.storage_offset() or not tensor.is_contiguous():
                tensor = args[position] = tensor.clone(memory_format=torch.contiguous_format)
            for dim in dims:
                torch._dynamo.maybe_mark_dynamic(tensor, dim)
        with _compile_failure_is_an_error(), torch._dynamo.config.patch(**{limit_key: RECOMPILE_LIMIT}):
            return compiled(*args)

    return call


@contextlib.contextmanager
def _compile_failure_is_an_error():
    """A failed compile (e.g. no C++ compiler for inductor on a CPU) as one `AttAttrError` line."""
    try:
        yield
    except torch._dynamo.exc.TorchDynamoException as exc:
        reason = str(exc).strip().splitlines()[0]
        raise AttAttrError(f"torch.compile of the layers failed ({reason}); run without compile") from exc


def forward_rows(adapter: EncoderAdapter, weights: Weights, rows: Rows, need_grad: bool,
                 functions: LayerFunctions = EAGER):
    """Run every row from its start layer to the logits.

    Returns (F [R], leaves): leaves is a list of (row slice, leaf tensor) whose gradients are the
    context gradients G of those rows (for the top layer with a position-0 head: row 0 only).
    """
    n_layers = adapter.n_layers
    top_shortcut = adapter.reads_first_token_only
    dtype = weights.dtype
    starts = rows.start_layer
    first = starts[0]
    bias = adapter.mask_bias(rows.key_mask, dtype) if rows.padded else None
    hidden = None  # states of the rows already running, in row order
    leaves = []
    begin = 0
    layout = rows.layout
    packed = False  # whether `hidden` holds packed tokens [T, 1, D] (else [rows, n or 1, D])
    for layer in range(first, n_layers):
        lw, gate = weights.layers[layer], weights.layer_gates[layer]
        end = begin
        while end < len(starts) and starts[end] == layer:
            end += 1
        is_top = top_shortcut and layer == n_layers - 1
        if hidden is not None:
            running_bias = None if bias is None else bias[:begin]
            if packed and is_top:  # position 0 of each row from here on
                hidden, packed = functions.top(adapter, lw, gate, layout.pad(hidden, begin), running_bias), False
            elif packed:
                hidden = packed_full_layer(adapter, lw, gate, hidden, running_bias, layout, begin)
            else:
                hidden = (functions.top if is_top else functions.full)(adapter, lw, gate, hidden, running_bias)
        if end > begin:
            alpha = rows.alpha[begin:end].to(dtype).view(-1, 1, 1, 1)
            context = rows.context[begin:end]
            residual = rows.hidden_in[begin:end]
            if is_top:
                context, residual = context[:, :, :1], residual[:, :1]
            leaf = (alpha * context.to(dtype)).detach().requires_grad_(need_grad)
            leaves.append((slice(begin, end), leaf))
            if layout is not None and not is_top:
                context, packed = _pack_heads(layout, leaf, begin, end), True
                residual = layout.pack(residual, begin, end).unsqueeze(1)
            else:
                context = leaf
            new = functions.from_context(adapter, lw, gate, context, residual.to(dtype))
            hidden = new if hidden is None else torch.cat([hidden, new], dim=0)
        begin = end
    if packed:  # a head that reads every position
        hidden = layout.pad(hidden, len(starts))
    logits = adapter.classify(weights, hidden, rows.key_mask)
    return target_probability(logits, rows.target), leaves


def context_gradients(adapter: EncoderAdapter, weights: Weights, rows: Rows,
                      functions: LayerFunctions = EAGER) -> tuple[Tensor, Tensor]:
    """(F [R], G [R, H, n, d] float32): one forward and one backward over the chunk."""
    with torch.enable_grad():
        with phase("rows forward"):
            prob, leaves = forward_rows(adapter, weights, rows, need_grad=True, functions=functions)
        # a compiled backward may compile on its first run, here
        with phase("rows backward"), contextlib.nullcontext() if functions is EAGER else _compile_failure_is_an_error():
            grads = torch.autograd.grad(prob.sum(), [leaf for _, leaf in leaves])
    with phase("accumulate"):
        grad = torch.zeros(rows.context.shape, dtype=torch.float32, device=rows.context.device)
        for (span, _), g in zip(leaves, grads):
            grad[span, :, : g.shape[2]] = g.float()
    return prob.detach(), grad


def baseline_probability(adapter: EncoderAdapter, weights: Weights, rows: Rows) -> Tensor:
    """F with the start layer's attention set to zero (α = 0), float32 [R]. Eager: one forward row per (example,
    layer), a small share of the work, and compiled functions would compile again without grad."""
    with torch.no_grad():
        prob, _ = forward_rows(adapter, weights, rows, need_grad=False)
    return prob


def gather_rows(prefix: Prefix, examples: Tensor, start: Tensor, alpha: Tensor, target: Tensor,
                padded: bool, pack_lengths: Tensor | None = None) -> tuple[Rows, Tensor]:
    """Rows for (examples, start layers, alphas), sorted by start layer; also the sort order. With
    `pack_lengths` (the group's real lengths, a host tensor), the rows run packed (`TokenLayout`).

    examples, start (long) and alpha are [R] host tensors: the bookkeeping needs no read from the device,
    only index copies to it, so the host can queue the next chunk while the device runs this one."""
    device = prefix.key_mask.device
    order = torch.sort(start, stable=True).indices
    examples, start = examples[order], start[order]
    on_device = examples.to(device, non_blocking=True)
    hidden, context = [], []
    begin = 0
    for layer, count in zip(*(t.tolist() for t in torch.unique_consecutive(start, return_counts=True))):
        block = on_device[begin : begin + count]
        hidden.append(prefix.layers[layer].hidden_in.index_select(0, block))
        context.append(prefix.layers[layer].context.index_select(0, block))
        begin += count
    n = prefix.key_mask.shape[1]
    layout = None if pack_lengths is None else TokenLayout.of(pack_lengths[examples], n, device)
    rows = Rows(start_layer=start.tolist(), padded=padded, alpha=alpha[order].to(device, non_blocking=True),
                hidden_in=torch.cat(hidden), context=torch.cat(context), key_mask=prefix.key_mask[on_device],
                target=target[on_device], layout=layout)
    return rows, order


def memory_budget(device: torch.device) -> int:
    """Bytes the rows of one chunk may take: half the free memory on CUDA (counting what torch's caching
    allocator holds but does not use, so a second call gets what the first had), 1 GiB on the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(0.5 * (free + cached))
    return 1 << 30  # beyond a GiB the CPU gains nothing from bigger batches


def row_bytes(adapter: EncoderAdapter, n: int, layers_per_row: float, dtype: torch.dtype) -> int:
    """Peak bytes one row at length n adds to its chunk when its chunk's rows run `layers_per_row` layers on
    average. Per layer, what autograd keeps (the weights are frozen, so no product keeps its input): Q, K, V,
    the attention output, both LayerNorm inputs and the activation's input, n·(6D + I), and 2·H·n² for an
    attention backend that keeps its scores or a materialised mask; once per row, one layer's gradients during
    the backward, n·(4D + 2I), all in `dtype`; and the row's float32 input, context and context gradient, and
    its leaf and the leaf's gradient in `dtype`. On BERT-base this is 1.3–1.7× the peak per row measured on
    the CPU (bench/memory_model.py, bench/results/cpu-memory_model.json)."""
    item = torch.finfo(dtype).bits // 8
    hidden, intermediate = adapter.hidden_size, adapter.model.config.intermediate_size
    kept_per_layer = n * (6 * hidden + intermediate) + 2 * adapter.n_heads * n * n
    backward = n * (4 * hidden + 2 * intermediate)
    buffers = n * hidden * (3 * 4 + 2 * item)
    return int((layers_per_row * kept_per_layer + backward) * item + buffers)


def mean_layers_per_row(adapter: EncoderAdapter, layers: list[int]) -> float:
    """Layers a row runs, on average over the targeted layers: the row for target layer l runs the L − l from l up."""
    return sum(adapter.n_layers - layer for layer in layers) / len(layers)


def default_rows_per_chunk(adapter: EncoderAdapter, n: int, layers: list[int], n_nodes: int, dtype: torch.dtype,
                           device: torch.device, budget: int | None = None) -> int:
    """Rows per chunk within a memory budget (bytes; None: `memory_budget(device)`), at most 8192. The row for
    target layer l runs the L − l layers from l up, so a chunk of whole examples (every targeted layer's rows)
    runs their mean; a chunk smaller than one example's rows may hold only the lowest layer's rows."""
    if budget is None:
        budget = memory_budget(device)
    rows_per_example = len(layers) * n_nodes
    rows = budget // row_bytes(adapter, n, mean_layers_per_row(adapter, layers), dtype)
    if rows < rows_per_example:
        rows = budget // row_bytes(adapter, n, adapter.n_layers - min(layers), dtype)
    return int(max(1, min(8192, rows)))


# What one more group costs beyond its rows, in row-tokens (rows × padded length) of work: launches, the
# per-group prefix and reductions, and on a GPU the lower efficiency of smaller products. Measured by
# `python bench/profile_engine.py --group-overhead` (the same sentences split into more groups). CPU: 285 on
# BERT-base, 2 shared cores (bench/results/cpu-profile_engine-group-overhead.json; medians of 2 runs, fit
# residuals up to 0.7 s of 11–21 s: a rough figure). CUDA: not yet measured; from the bf16 products measured
# on an H200 (bench/GPU_NOTES.md), rate = peak · T / (T + T0) through T = 4k and 64k tokens gives T0 ≈ 17k
# for [T, 768] @ [768, 768] and 4k for @ [768, 3072], ≈ 8k weighted by FLOPs per layer, ≈ 16k row-tokens
# per chunk once the rows' staggered start layers count.
GROUP_OVERHEAD_TOKENS = {"cpu": 285, "cuda": 16384}
MAX_GROUP_EXAMPLES = 4096  # bounds plan_groups' search (and a group's outputs) when rows per chunk are huge
# Rows run packed (`TokenLayout`) when the group's padded tokens exceed its real ones by more than this fraction.
# On the CPU packing paid at 12% padding and cost nothing at 2% (bench/results/cpu-packing_ab*.json); on a GPU
# its copies weigh more against the products, and the GPU is not measured yet (bench/gpu_session.sh packing).
PACK_ABOVE_PADDING = 0.1


def plan_groups(sorted_lengths: list[int], rows_per_example: int, rows_for,
                overhead_tokens: int) -> list[tuple[int, int, int]]:
    """Splits examples (lengths ascending) into groups of consecutive examples: [(begin, end, rows per chunk)].

    A group is padded to its longest length n and holds at most `rows_for(n)` rows (non-increasing in n),
    so it runs as one chunk (one example whose rows exceed that runs in several), and at most
    MAX_GROUP_EXAMPLES examples. Among those splits it
    takes the one with the least work: Σ over groups of overhead_tokens + examples · rows_per_example · n,
    that is padding against fewer, larger chunks (dynamic programming over the group ends)."""
    lengths = np.asarray(sorted_lengths, dtype=np.int64)
    count = len(lengths)
    rows_at = {int(n): rows_for(int(n)) for n in np.unique(lengths)}
    cost = np.zeros(count + 1)  # cost[e]: least work for the first e examples
    begin_of = np.zeros(count + 1, dtype=np.int64)
    for end in range(1, count + 1):
        n = int(lengths[end - 1])
        first = max(0, end - min(MAX_GROUP_EXAMPLES, max(1, rows_at[n] // rows_per_example)))
        starts = np.arange(first, end)
        options = cost[first:end] + overhead_tokens + (end - starts) * rows_per_example * n
        best = int(np.argmin(options))  # on a tie the earliest start: the larger group
        cost[end], begin_of[end] = options[best], first + best
    groups = []
    end = count
    while end > 0:
        begin = int(begin_of[end])
        groups.append((begin, end, rows_at[int(lengths[end - 1])]))
        end = begin
    return groups[::-1]


def plan_batch(adapter: EncoderAdapter, sorted_lengths: list[int], layers: list[int], n_nodes: int,
               dtype: torch.dtype, device: torch.device, internal_batch_size: int | None = None,
               budget: int | None = None, planner=None) -> list[tuple[int, int, int]]:
    """The groups `AttentionAttribution.attribute` runs for examples of these lengths (ascending), each with
    a row per (targeted layer, node). Rows per chunk: `internal_batch_size`, else what the memory budget
    (None: `memory_budget(device)`) holds at each group's length; the split: `planner` (None: `plan_groups`)
    with the device's per-group overhead."""
    if internal_batch_size is None and budget is None:
        budget = memory_budget(device)

    def rows_for(n: int) -> int:
        return internal_batch_size or default_rows_per_chunk(adapter, n, layers, n_nodes, dtype, device, budget)

    overhead = GROUP_OVERHEAD_TOKENS.get(device.type, GROUP_OVERHEAD_TOKENS["cuda"])
    return (planner or plan_groups)(sorted_lengths, len(layers) * n_nodes, rows_for, overhead)


@dataclass
class GroupResult:
    """Per-example outputs of one group, at the group's length n (float32)."""

    head_max: Tensor  # [B, L', H]
    head_argmax: Tensor  # long [B, L', H, 2]: (i, j) of each head's maximum
    layer_attr: Tensor  # [B, L', n, n]
    prob: Tensor  # [B]
    target: Tensor  # [B]
    baseline: Tensor  # [B, L'] F with the layer's attention zeroed
    attr_sum: Tensor  # [B, L'] Σ attributions
    attributions: Tensor | None  # [B, L', H, n, n]
    attention: Tensor | None  # [B, L', H, n, n]


def runs_packed(lengths: Tensor | None, n: int, functions: LayerFunctions = EAGER) -> bool:
    """Whether a group of examples with these real lengths (host tensor; None: unknown), padded to n, runs its
    rows packed: eager rows whose padding exceeds PACK_ABOVE_PADDING."""
    return (lengths is not None and functions is EAGER
            and n * len(lengths) > (1 + PACK_ABOVE_PADDING) * int(lengths.sum()))


def attribute_group(
    adapter: EncoderAdapter,
    prefix_weights: Weights,
    row_weights: Weights,
    input_ids: Tensor,
    key_mask: Tensor,
    token_type_ids: Tensor | None,
    target: Tensor | None,
    layers: list[int],
    alphas: Tensor,
    quad_weights: Tensor,
    full_output: bool,
    rows_per_chunk: int,
    reduce_layer,
    lengths: Tensor | None = None,
    functions: LayerFunctions = EAGER,
) -> GroupResult:
    """Attributions for a group of examples padded to a common length (padding masked).

    `reduce_layer(state, context_grad, key_mask, full)` → (attributions [B, H, n, n] or None,
    head_max [B, H], head_argmax [B, H, 2], layer_attr [B, n, n]) is the backend: the torch ops in
    this module or the Triton kernel. `lengths`: the examples' real lengths, a host tensor [B] (None: treated
    as padded), so the group knows without reading the device whether it needs a mask bias and whether its rows
    run packed. `functions`: what runs the rows' layers in their gradient pass (eager or compiled; compiled
    rows run padded).
    """
    device = input_ids.device
    n = input_ids.shape[1]
    padded = lengths is None or int(lengths.min()) < n
    pack_lengths = lengths if runs_packed(lengths, n, functions) else None
    keep_qk = getattr(reduce_layer, "needs_qk", False)
    with phase("prefix"):
        prefix = run_prefix(adapter, prefix_weights, input_ids, key_mask, token_type_ids, layers,
                            keep_probs=full_output or not keep_qk, keep_qk=keep_qk)
        if target is None:
            target = prefix.logits.argmax(-1)
        prob = target_probability(prefix.logits, target)
    n_ex, n_layers, n_nodes = input_ids.shape[0], len(layers), len(alphas)
    alphas, quad_weights = alphas.cpu(), quad_weights.cpu()

    # Rows (example, layer, node) in that order, chunked; Ḡ accumulated with the quadrature weights.
    # The row bookkeeping lives on the host (see gather_rows).
    example = torch.arange(n_ex).repeat_interleave(n_layers * n_nodes)
    layer_idx = torch.arange(n_layers).repeat_interleave(n_nodes).repeat(n_ex)
    node = torch.arange(n_nodes).repeat(n_ex * n_layers)
    start_of = torch.tensor(layers)
    ctx_shape = prefix.layers[layers[0]].context.shape[1:]
    grad_sum = torch.zeros((n_ex * n_layers, *ctx_shape), dtype=torch.float32, device=device)
    for begin in range(0, len(example), rows_per_chunk):
        span = slice(begin, begin + rows_per_chunk)
        with phase("gather"):
            rows, order = gather_rows(prefix, example[span], start_of[layer_idx[span]], alphas[node[span]], target,
                                      padded, pack_lengths)
        _, grad = context_gradients(adapter, row_weights, rows, functions)
        with phase("accumulate"):
            slot = (example[span] * n_layers + layer_idx[span])[order].to(device, non_blocking=True)
            weight = quad_weights[node[span]][order].to(device, non_blocking=True)
            grad_sum.index_add_(0, slot, grad * weight.view(-1, 1, 1, 1))

    # F(layer l's attention = 0): one row per (example, layer) at α = 0, no backward.
    with phase("baseline"):
        baseline = torch.empty(n_ex * n_layers, dtype=torch.float32, device=device)
        base_example = torch.arange(n_ex).repeat_interleave(n_layers)
        base_layer = torch.arange(n_layers).repeat(n_ex)
        for begin in range(0, len(base_example), rows_per_chunk):
            span = slice(begin, begin + rows_per_chunk)
            zero = torch.zeros(len(base_example[span]))
            rows, order = gather_rows(prefix, base_example[span], start_of[base_layer[span]], zero, target, padded,
                                      pack_lengths)
            slot = (base_example[span] * n_layers + base_layer[span])[order].to(device, non_blocking=True)
            baseline[slot] = baseline_probability(adapter, row_weights, rows)

    with phase("reduce"):
        grad_sum = grad_sum.view(n_ex, n_layers, *ctx_shape)
        head_max, head_argmax, layer_attr, attr_sum, attributions, attention = [], [], [], [], [], []
        for li, layer in enumerate(layers):
            state = prefix.layers[layer]
            attr, hmax, hpos, lsum = reduce_layer(state, grad_sum[:, li], prefix.key_mask, full_output)
            head_max.append(hmax)
            head_argmax.append(hpos)
            layer_attr.append(lsum)
            attr_sum.append(lsum.sum(dim=(-1, -2)))
            if full_output:
                attributions.append(attr)
                present = None if adapter.kept_heads is None else adapter.present_heads[layer]
                attention.append(_masked_probs(state.probs, prefix.key_mask, present))
        result = GroupResult(
            head_max=torch.stack(head_max, 1),
            head_argmax=torch.stack(head_argmax, 1),
            layer_attr=torch.stack(layer_attr, 1),
            prob=prob,
            target=target,
            baseline=baseline.view(n_ex, n_layers),
            attr_sum=torch.stack(attr_sum, 1),
            attributions=torch.stack(attributions, 1) if full_output else None,
            attention=torch.stack(attention, 1) if full_output else None,
        )
    return result


def _masked_probs(probs: Tensor, key_mask: Tensor, present: Tensor | None = None) -> Tensor:
    """A [B, H, n, n] with padded pairs and the heads not `present` [H] (a pruned model's removed heads) zero."""
    keep = reductions.pair_mask(key_mask).unsqueeze(1)
    if present is not None:
        keep = keep & present.to(keep.device).view(1, -1, 1, 1)
    return probs.float().masked_fill(~keep, 0.0)


def reduce_layer_torch(state: LayerState, context_grad: Tensor, key_mask: Tensor, full: bool):
    """Torch backend: materialise A ⊙ (Ḡ Vᵀ) [B, H, n, n] and reduce it."""
    attr = reductions.attribution_from_context_grad(state.probs, state.values, context_grad)
    attr = attr.masked_fill(~reductions.pair_mask(key_mask).unsqueeze(1), 0.0)
    head_max, head_argmax = reductions.masked_head_max(attr, key_mask)
    return (attr if full else None), head_max, head_argmax, attr.sum(dim=1)
