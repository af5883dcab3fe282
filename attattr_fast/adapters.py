"""Model adapters: a BERT-family classifier as plain functions over its weights.

The engine needs to enter a model half-way through a layer (at the attention context of the target
layer) and to run only part of the top layer, which `transformers`' modules cannot do. An adapter
exposes one model as

    embed(ids, types, mask) → X⁰;  per layer l: project_qkv, attention_output(ctx, X), feed_forward
    (layer_output: the two together);
    classify(X^L, mask) → logits

over a `Weights` snapshot in any dtype. The per-layer functions take that layer's `LayerWeights` (and
gate), not a layer index, so one compiled function serves every layer. Every family here is post-LayerNorm:

    X' = LN(X + W_o · merge_h(gate_h · ctx_h) + b_o),   X^{l+1} = LN(X' + W_2 · act(W_1 X' + b_1) + b_2)

`head_gates` [L, H] scale each head's context (1 = kept, 0 = gated off); transformers 5 dropped head
masks, so head pruning works through these. Other families plug in with `register_adapter`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from attattr_fast.errors import UnsupportedModelError

# Config attribute of a physically pruned model: the original indices of the heads kept in each layer.
KEPT_HEADS_CONFIG_KEY = "attattr_kept_heads"


@dataclass
class LayerWeights:
    """One encoder layer's weights. Q, K and V are one [3·H·d, D] product (rows: Q, then K, then V; heads
    stacked within each), so the forward runs one matrix product for them and the backward one for their
    input gradient."""

    wqkv: Tensor
    bqkv: Tensor
    wo: Tensor
    bo: Tensor
    ln_attn_w: Tensor
    ln_attn_b: Tensor
    w_in: Tensor
    b_in: Tensor
    w_out: Tensor
    b_out: Tensor
    ln_ffn_w: Tensor
    ln_ffn_b: Tensor


@dataclass
class Weights:
    """A snapshot of the encoder layers, gates and head in one dtype; embeddings stay in the model."""

    layers: list[LayerWeights]
    gates: Tensor  # [L, H]
    head: dict[str, Tensor]
    dtype: torch.dtype
    # per layer: its gates [H], or None where all are 1 (the context is then not multiplied: one element-wise
    # pass less each way); derived from `gates`, so `dataclasses.replace(w, gates=...)` recomputes it
    layer_gates: list[Tensor | None] = field(init=False)

    def __post_init__(self):
        all_one = (self.gates == 1).all(dim=1).tolist()
        self.layer_gates = [None if one else gate for one, gate in zip(all_one, self.gates)]


def _linear(module: torch.nn.Linear) -> tuple[Tensor, Tensor]:
    return module.weight.detach(), module.bias.detach()


class EncoderAdapter:
    """A post-LN BERT-like encoder with a classification head that reads position 0 only.

    Subclasses say where the base model and head live (`_base`, `_head_weights`, `_classify`) and
    how tokens are embedded (`embed`).
    """

    family = "bert"
    reads_first_token_only = True

    def __init__(self, model: torch.nn.Module):
        self.model = model
        config = model.config
        if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
            raise UnsupportedModelError(f"{type(model).__name__}: decoder configurations are not supported")
        pos_type = getattr(config, "position_embedding_type", "absolute")
        if pos_type not in (None, "absolute"):
            raise UnsupportedModelError(f"position_embedding_type={pos_type!r} is not supported (absolute only)")
        self.config = config
        self.n_layers = config.num_hidden_layers
        self.n_heads = config.num_attention_heads
        self.hidden_size = config.hidden_size
        self.head_dim = config.hidden_size // config.num_attention_heads
        # A physically pruned model (attattr_fast.pruning) keeps its original head numbering here: its removed heads
        # are zero weights with gate 0, so every layer has the same H heads and the results number heads as the
        # unpruned model does. A removed head has V = 0 and gate 0, hence no attribution; its attention is reported
        # as 0.
        kept = getattr(config, KEPT_HEADS_CONFIG_KEY, None)
        self.kept_heads = None if kept is None else [sorted(int(h) for h in heads) for heads in kept]
        self.present_heads = torch.ones(self.n_layers, self.n_heads, dtype=torch.bool)
        for layer, heads in enumerate(self.kept_heads or []):
            self.present_heads[layer] = False
            self.present_heads[layer, heads] = True
        self.scale = self.head_dim**-0.5
        self.eps = config.layer_norm_eps
        if config.num_labels < 2:  # F, the target class's softmax probability, would be 1 whatever the input
            raise UnsupportedModelError(
                f"{type(model).__name__} has {config.num_labels} output (a regression head); attribution needs a "
                "classifier of 2 or more classes"
            )
        problem = getattr(config, "problem_type", None)
        if problem in ("regression", "multi_label_classification"):  # their outputs are not one softmax
            raise UnsupportedModelError(
                f"{type(model).__name__} is configured for {problem}; attattr-fast attributes the softmax "
                "probability of one class (single-label classification)"
            )
        from transformers.activations import ACT2FN

        self.act = ACT2FN[config.hidden_act] if isinstance(config.hidden_act, str) else config.hidden_act
        self.head_gates = self.present_heads.float()  # removed heads are off; gates can switch heads off, not on

    @property
    def gates_in_effect(self) -> Tensor:
        """float32 [L, H] on the CPU: `head_gates` times `present_heads` (a removed head stays off whatever its
        gate says). What the engine runs and what every ranking of heads reads."""
        return self.head_gates.detach().float().cpu() * self.present_heads

    # -- where the weights live -------------------------------------------------------------
    def _base(self) -> torch.nn.Module:
        return self.model.bert

    def _head_weights(self) -> dict[str, Tensor]:
        dense_w, dense_b = _linear(self.model.bert.pooler.dense)
        out_w, out_b = _linear(self.model.classifier)
        return {"dense_w": dense_w, "dense_b": dense_b, "out_w": out_w, "out_b": out_b}

    def _head_activation(self, x: Tensor) -> Tensor:
        return torch.tanh(x)

    _num_labels: int | None = None  # set by an adapter that assigns num_labels

    @property
    def num_labels(self) -> int:
        """Classes of the head as it is now (a head replaced after this adapter was made counts): the rows of its
        output weight `out_w`; for a head without one, the config's count, unless the adapter assigns its own."""
        if self._num_labels is not None:
            return self._num_labels
        out_w = self._head_weights().get("out_w")
        return int(out_w.shape[0]) if out_w is not None else int(self.config.num_labels)

    @num_labels.setter
    def num_labels(self, value: int) -> None:
        self._num_labels = int(value)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def max_length(self) -> int:
        return self.max_length_of(self.config)

    @staticmethod
    def max_length_of(config) -> int:
        """The longest input a model of this family with `config` takes."""
        return int(config.max_position_embeddings)

    def weights(self, dtype: torch.dtype | None = None) -> Weights:
        """Detached weights in `dtype` (default: the model's own; no copy in that case)."""
        dtype = dtype or self.dtype
        layers = []
        for index, layer in enumerate(self._base().encoder.layer):
            wqkv, bqkv, wo = self._attention_weights(layer.attention, index)
            tensors = [
                wqkv, bqkv, wo, layer.attention.output.dense.bias.detach(),
                layer.attention.output.LayerNorm.weight.detach(), layer.attention.output.LayerNorm.bias.detach(),
                *_linear(layer.intermediate.dense), *_linear(layer.output.dense),
                layer.output.LayerNorm.weight.detach(), layer.output.LayerNorm.bias.detach(),
            ]  # fmt: skip
            layers.append(LayerWeights(*(_usable(t, dtype) for t in tensors)))
        head = {k: _usable(v, dtype) for k, v in self._head_weights().items()}
        # a copy: a later change to head_gates must not reach a snapshot whose layer_gates are already derived
        gates = self.gates_in_effect.to(device=self.device, dtype=dtype, copy=True)
        return Weights(layers=layers, gates=gates, head=head, dtype=dtype)

    def _attention_weights(self, attention: torch.nn.Module, layer: int) -> tuple[Tensor, Tensor, Tensor]:
        """(W_qkv [3·H·d, D], b_qkv [3·H·d], W_o [D, H·d]) of one layer; a pruned layer's kept heads go to their
        original places among zeros."""
        projections = [getattr(attention.self, name, None) for name in ("query", "key", "value")]
        wo = attention.output.dense.weight.detach()
        if self.kept_heads is None:
            return (torch.cat([p.weight.detach() for p in projections]),
                    torch.cat([p.bias.detach() for p in projections]), wo)  # fmt: skip
        heads, (hidden, d) = self.kept_heads[layer], (self.hidden_size, self.head_dim)
        full_wqkv = wo.new_zeros(3, self.n_heads, d, hidden)
        full_bqkv = wo.new_zeros(3, self.n_heads, d)
        full_wo = wo.new_zeros(hidden, self.n_heads, d)
        if heads:  # a layer without heads has no Q, K, V projections (pruning.EmptySelfAttention)
            full_wqkv[:, heads] = torch.stack([p.weight.detach().view(len(heads), d, hidden) for p in projections])
            full_bqkv[:, heads] = torch.stack([p.bias.detach().view(len(heads), d) for p in projections])
            full_wo[:, heads] = wo.view(hidden, len(heads), d)
        return full_wqkv.view(-1, hidden), full_bqkv.view(-1), full_wo.view(hidden, -1)

    # -- the model as functions ---------------------------------------------------------------
    def embed(self, input_ids: Tensor, token_type_ids: Tensor | None, attention_mask: Tensor | None,
              dtype: torch.dtype | None = None) -> Tensor:
        """X⁰ [B, n, D] computed in `dtype` (default: the model's)."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        return self._sum_and_normalise(input_ids, token_type_ids, positions, dtype)

    def _sum_and_normalise(self, input_ids: Tensor, token_type_ids: Tensor | None, positions: Tensor,
                           dtype: torch.dtype | None) -> Tensor:
        emb = self._base().embeddings
        dtype = dtype or self.dtype
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = emb.word_embeddings(input_ids).to(dtype) + emb.token_type_embeddings(token_type_ids).to(dtype)
        x = x + emb.position_embeddings(positions).to(dtype)
        norm = emb.LayerNorm
        return F.layer_norm(x, x.shape[-1:], norm.weight.to(dtype), norm.bias.to(dtype), norm.eps).detach()

    def project_qkv(self, lw: LayerWeights, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Q, K, V [B, H, n, d] of a layer from its input `x` [B, n, D]: one product, split."""
        qkv = F.linear(x, lw.wqkv, lw.bqkv)
        return tuple(self._split_heads(t) for t in qkv.chunk(3, dim=-1))

    def project_kv(self, lw: LayerWeights, x: Tensor) -> tuple[Tensor, Tensor]:
        width = self.n_heads * self.head_dim
        kv = F.linear(x, lw.wqkv[width:], lw.bqkv[width:])
        return self._split_heads(kv[..., :width]), self._split_heads(kv[..., width:])

    def project_q(self, lw: LayerWeights, x: Tensor) -> Tensor:
        width = self.n_heads * self.head_dim
        return self._split_heads(F.linear(x, lw.wqkv[:width], lw.bqkv[:width]))

    def attention_output(self, lw: LayerWeights, gate: Tensor | None, ctx: Tensor, residual: Tensor) -> Tensor:
        """LN(residual + W_o merge(gate · ctx) + b_o); gate [H] (None: all 1), ctx [B, H, n, d], residual
        [B, n, D]."""
        if gate is not None:
            ctx = ctx * gate.view(1, -1, 1, 1)
        merged = ctx.transpose(1, 2).reshape(*residual.shape[:-1], self.n_heads * self.head_dim)
        out = F.linear(merged, lw.wo, lw.bo) + residual
        return F.layer_norm(out, out.shape[-1:], lw.ln_attn_w, lw.ln_attn_b, self.eps)

    def layer_output(self, lw: LayerWeights, gate: Tensor | None, ctx: Tensor, residual: Tensor) -> Tensor:
        """The layer's output X^{l+1} from its attention context and its input X^l (the residual)."""
        return self.feed_forward(lw, self.attention_output(lw, gate, ctx, residual))

    def feed_forward(self, lw: LayerWeights, h: Tensor) -> Tensor:
        out = F.linear(self.act(F.linear(h, lw.w_in, lw.b_in)), lw.w_out, lw.b_out) + h
        return F.layer_norm(out, out.shape[-1:], lw.ln_ffn_w, lw.ln_ffn_b, self.eps)

    def classify(self, w: Weights, hidden: Tensor, key_mask: Tensor | None) -> Tensor:
        """Logits [B, C] from the last hidden states [B, n, D] (only position 0 is read here)."""
        h = w.head
        x = self._head_activation(F.linear(hidden[:, 0], h["dense_w"], h["dense_b"]))
        return F.linear(x, h["out_w"], h["out_b"])

    def _split_heads(self, x: Tensor) -> Tensor:
        return x.view(*x.shape[:-1], self.n_heads, self.head_dim).transpose(-3, -2)

    @staticmethod
    def mask_bias(key_mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
        """Additive [B, 1, 1, n] bias: 0 for real keys, the dtype's minimum for padding (as transformers)."""
        if key_mask is None:
            return None
        bias = torch.zeros(key_mask.shape, dtype=dtype, device=key_mask.device)
        bias.masked_fill_(~key_mask.bool(), torch.finfo(dtype).min)
        return bias[:, None, None, :]

    def attention_probs(self, q: Tensor, k: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
        """(A, lse): softmax(QKᵀ·scale + bias) [B, H, n, n] and its row log-sum-exp [B, H, n]."""
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        if bias is not None:
            scores = scores + bias
        lse = torch.logsumexp(scores, dim=-1)
        return torch.exp(scores - lse.unsqueeze(-1)), lse

    @torch.no_grad()
    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        weights: Weights | None = None,
    ) -> Tensor:
        """Logits [B, C] of the whole model through the adapter (gates applied)."""
        w = weights or self.weights()
        x = self.embed(input_ids, token_type_ids, attention_mask, w.dtype)
        bias = self.mask_bias(attention_mask, w.dtype)
        for layer, lw in enumerate(w.layers):
            q, k, v = self.project_qkv(lw, x)
            probs, _ = self.attention_probs(q, k, bias)
            x = self.layer_output(lw, w.layer_gates[layer], probs @ v, x)
        return self.classify(w, x, attention_mask).float()


class RobertaAdapter(EncoderAdapter):
    """RoBERTa and XLM-R: positions count real tokens from padding_idx + 1; dense → tanh head."""

    family = "roberta"

    def _base(self) -> torch.nn.Module:
        return self.model.roberta

    def _head_weights(self) -> dict[str, Tensor]:
        dense_w, dense_b = _linear(self.model.classifier.dense)
        out_w, out_b = _linear(self.model.classifier.out_proj)
        return {"dense_w": dense_w, "dense_b": dense_b, "out_w": out_w, "out_b": out_b}

    @staticmethod
    def max_length_of(config) -> int:  # positions start after the padding index
        return int(config.max_position_embeddings) - int(config.pad_token_id) - 1

    def embed(self, input_ids: Tensor, token_type_ids: Tensor | None, attention_mask: Tensor | None,
              dtype: torch.dtype | None = None) -> Tensor:
        pad = self._base().embeddings.padding_idx
        real = input_ids.ne(pad).long()
        positions = torch.cumsum(real, dim=1) * real + pad
        return self._sum_and_normalise(input_ids, token_type_ids, positions, dtype)


class ElectraAdapter(EncoderAdapter):
    """ELECTRA: embeddings of their own width, projected to the hidden size; dense → GELU head."""

    family = "electra"

    def _base(self) -> torch.nn.Module:
        return self.model.electra

    def _head_weights(self) -> dict[str, Tensor]:
        dense_w, dense_b = _linear(self.model.classifier.dense)
        out_w, out_b = _linear(self.model.classifier.out_proj)
        return {"dense_w": dense_w, "dense_b": dense_b, "out_w": out_w, "out_b": out_b}

    def _head_activation(self, x: Tensor) -> Tensor:
        return self.model.classifier.activation(x)

    def embed(self, input_ids: Tensor, token_type_ids: Tensor | None, attention_mask: Tensor | None,
              dtype: torch.dtype | None = None) -> Tensor:
        x = super().embed(input_ids, token_type_ids, attention_mask, dtype)
        project = getattr(self._base(), "embeddings_project", None)
        if project is None:
            return x
        return F.linear(x, project.weight.to(x.dtype), project.bias.to(x.dtype)).detach()


def _usable(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """`weight` in `dtype` (no copy when it is already), as a normal tensor: weights made under
    `torch.inference_mode()` are copied, since autograd may not save them."""
    weight = weight.to(dtype)
    return weight.clone() if weight.is_inference() else weight


_ADAPTERS: dict[str, type[EncoderAdapter]] = {
    "BertForSequenceClassification": EncoderAdapter,
    "RobertaForSequenceClassification": RobertaAdapter,
    "XLMRobertaForSequenceClassification": RobertaAdapter,
    "ElectraForSequenceClassification": ElectraAdapter,
}


def register_adapter(model_class: type | str, adapter_class: type[EncoderAdapter]) -> None:
    """Make `adapter_for` use `adapter_class` for models of `model_class` (a class or its name)."""
    if not (isinstance(adapter_class, type) and issubclass(adapter_class, EncoderAdapter)):
        raise TypeError(f"register_adapter needs a subclass of EncoderAdapter, got {adapter_class!r}")
    if not isinstance(model_class, (str, type)):
        raise TypeError(f"register_adapter needs a model class or its name, got {model_class!r}")
    name = model_class if isinstance(model_class, str) else model_class.__name__
    _ADAPTERS[name] = adapter_class


def supported_families() -> list[str]:
    return sorted(_ADAPTERS)


def adapter_class(model: torch.nn.Module) -> type[EncoderAdapter]:
    """The adapter class for `model`'s class; an `UnsupportedModelError` naming the supported classes otherwise."""
    for cls in type(model).__mro__:
        if cls.__name__ in _ADAPTERS:
            return _ADAPTERS[cls.__name__]
    raise UnsupportedModelError(
        f"unsupported model {type(model).__name__}; supported: {', '.join(supported_families())}"
    )


def adapter_for(model: torch.nn.Module) -> EncoderAdapter:
    """The adapter of `model`; an `UnsupportedModelError` naming the supported classes otherwise. A subclass of
    a supported class gets its parent's adapter only if that adapter computes the model's own logits."""
    if isinstance(model, EncoderAdapter):
        return model
    adapter = adapter_class(model)(model)
    if type(model).__name__ not in _ADAPTERS:
        _check_subclass(adapter)
    return adapter


def _check_subclass(adapter: EncoderAdapter) -> None:
    """Refuses a subclass of a supported model whose forward the adapter does not reproduce (another head or
    pooling, say): its attributions would be of another function. One forward of an 8-token probe."""
    from attattr_fast.inputs import evaluation_mode

    model = adapter.model
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, adapter.config.vocab_size, (2, 8), generator=generator).to(adapter.device)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    parent = next(c.__name__ for c in type(model).__mro__ if c.__name__ in _ADAPTERS)
    with torch.no_grad(), evaluation_mode(model):
        try:
            output = model(input_ids=ids, attention_mask=mask)
            own = (output.logits if hasattr(output, "logits") else output[0]).double()  # or a tuple (return_dict off)
        except Exception as exc:  # noqa: BLE001 - any failure means the subclass is not the parent's kind
            raise UnsupportedModelError(f"{type(model).__name__} (a {parent}) does not run as {parent} does "
                                        f"({type(exc).__name__}); register an adapter for it") from None  # fmt: skip
        ours = adapter.forward(ids, mask).double()
    exact = adapter.dtype in (torch.float32, torch.float64)  # rounding apart, the same function agrees closely
    tolerance = (1e-3 if exact else 3e-2) * float(own.abs().max()) + (1e-6 if exact else 1e-3)
    if own.shape != ours.shape or float((own - ours).abs().max()) > tolerance:
        raise UnsupportedModelError(
            f"{type(model).__name__} subclasses {parent} but computes other outputs than {parent}; attattr-fast "
            "would attribute another function. Register an adapter for it (attattr_fast.register_adapter)"
        )


def max_length(model: torch.nn.Module) -> int:
    """The longest input `model` takes, without building its adapter (for a command that only trains or
    predicts)."""
    if isinstance(model, EncoderAdapter):
        return model.max_length
    return adapter_class(model).max_length_of(model.config)
