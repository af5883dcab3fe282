import copy
import dataclasses

import pytest
import torch

from attattr_fast import UnsupportedModelError, adapter_for

from conftest import FAMILIES, padded_batch, tiny_classifier
from tolerances import ADAPTER_ATOL


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_reproduces_transformers_logits(family):
    model = tiny_classifier(family)
    ids, mask, types = padded_batch(model, [9, 6, 1], pair_at=4)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    got = adapter_for(model).forward(ids, mask, types)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=ADAPTER_ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_reproduces_logits_of_order_one_relative_to_their_size(family):
    """The init's logits are about 0.02, where an absolute 1e-5 allows 1e-3 relative: here weights of std 0.3 and
    a LayerNorm epsilon of 0.1 make every setting of each layer visible in logits of order 1."""
    model = tiny_classifier(family, layer_norm_eps=0.1)
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embeddings" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    ids, mask, types = padded_batch(model, [9, 6, 1], pair_at=4)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    got = adapter_for(model).forward(ids, mask, types)
    scale = expected.abs().max().item()
    assert scale > 0.5, scale
    assert (got - expected).abs().max().item() <= 1e-5 * scale


@pytest.mark.parametrize("family", FAMILIES)
def test_head_gate_equals_zeroing_that_heads_values(family):
    """A gated head contributes no context: the same as zeroing its rows of W_V and b_V."""
    model = tiny_classifier(family)
    layer, head = 1, 2
    ids, mask, types = padded_batch(model, [8, 5])
    adapter = adapter_for(model)
    adapter.head_gates[layer, head] = 0.0
    got = adapter.forward(ids, mask, types)

    zeroed = copy.deepcopy(model)
    value = zeroed.base_model.encoder.layer[layer].attention.self.value
    d = model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        value.weight[head * d : (head + 1) * d] = 0
        value.bias[head * d : (head + 1) * d] = 0
        expected = zeroed(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    torch.testing.assert_close(got, expected, atol=ADAPTER_ATOL, rtol=0)
    assert not torch.allclose(got, adapter_for(model).forward(ids, mask, types))


def test_layers_with_all_gates_one_skip_the_multiply_and_replace_recomputes_it():
    adapter = adapter_for(tiny_classifier("bert"))
    adapter.head_gates[1, 2] = 0.5
    w = adapter.weights()
    assert w.layer_gates[0] is None and w.layer_gates[2] is None
    torch.testing.assert_close(w.layer_gates[1], w.gates[1])
    regated = dataclasses.replace(w, gates=torch.ones_like(w.gates).index_fill_(0, torch.tensor([0]), 0.0))
    assert regated.layer_gates[1] is None and regated.layer_gates[2] is None
    assert torch.equal(regated.layer_gates[0], torch.zeros(4))


def test_unsupported_family_is_named_in_one_line():
    import transformers as T

    model = T.DistilBertForSequenceClassification(T.DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2,
                                                                     hidden_dim=32))  # fmt: skip
    with pytest.raises(UnsupportedModelError) as info:
        adapter_for(model)
    message = str(info.value)
    assert "DistilBertForSequenceClassification" in message and "BertForSequenceClassification" in message
    assert "\n" not in message


def test_relative_position_embeddings_are_refused():
    model = tiny_classifier("bert")
    model.config.position_embedding_type = "relative_key"
    with pytest.raises(UnsupportedModelError, match="position_embedding_type"):
        adapter_for(model)
