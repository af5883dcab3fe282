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


def _mean_pooling_subclass():
    """A subclass of BERT's classifier with the same modules but another head: the mean of the last states."""
    import transformers as T
    from transformers.modeling_outputs import SequenceClassifierOutput

    class MeanPoolBert(T.BertForSequenceClassification):
        def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, **kwargs):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)[0]
            return SequenceClassifierOutput(logits=self.classifier(hidden.mean(1)))

    class TaggedBert(T.BertForSequenceClassification):  # the parent's forward, one more attribute
        tag = "mine"

    return MeanPoolBert, TaggedBert


def test_a_subclass_gets_its_parents_adapter_only_if_that_reproduces_it():
    import transformers as T

    from attattr_fast import AttentionAttribution, reference

    base = tiny_classifier("bert")
    mean_pool, tagged = _mean_pooling_subclass()
    for cls in (mean_pool, tagged):
        model = cls(base.config).eval()
        model.load_state_dict(base.state_dict())
        if cls is mean_pool:
            with pytest.raises(UnsupportedModelError, match="MeanPoolBert subclasses BertForSequenceClassification "
                                                            "but computes other outputs"):  # fmt: skip
                adapter_for(model)
            continue
        ids, mask, _ = padded_batch(model, [7, 4])
        tuples = cls(T.BertConfig(**{**base.config.to_dict(), "return_dict": False})).eval()  # logits in a tuple
        tuples.load_state_dict(base.state_dict())
        assert adapter_for(tuples).num_labels == 3
        got = AttentionAttribution(model).attribute(ids, mask, n_steps=2, method="gausslegendre")
        want = reference.attribute(model, ids, mask, n_steps=2, method="gausslegendre")
        torch.testing.assert_close(got.attributions, want.attributions, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("problem", ["multi_label_classification", "regression"])
def test_heads_that_are_not_one_softmax_are_refused(problem):
    with pytest.raises(UnsupportedModelError, match=f"configured for {problem}"):
        adapter_for(tiny_classifier("bert", problem_type=problem))


def test_a_head_replaced_after_the_adapter_was_made_sets_the_classes():
    from attattr_fast import AttAttrError, AttentionAttribution

    model = tiny_classifier("bert", num_labels=3)
    aa = AttentionAttribution(model)
    ids, mask, _ = padded_batch(model, [6])
    model.classifier = torch.nn.Linear(model.config.hidden_size, 5)
    assert int(aa.attribute(ids, mask, target=4, n_steps=1, output="reduced").target[0]) == 4
    model.classifier = torch.nn.Linear(model.config.hidden_size, 2)
    with pytest.raises(AttAttrError, match="the model has 2 classes"):
        aa.attribute(ids, mask, target=2, n_steps=1)


def test_an_adapter_whose_head_has_no_output_matrix_counts_the_configs_classes_or_its_own():
    from attattr_fast.adapters import EncoderAdapter

    class CosineHeadAdapter(EncoderAdapter):  # a head of label embeddings, set up after the base's __init__
        def __init__(self, model):
            super().__init__(model)
            self.labels = torch.randn(model.config.num_labels, model.config.hidden_size)

        def _head_weights(self):
            return {"labels": self.labels}

    adapter = CosineHeadAdapter(tiny_classifier("bert", num_labels=4))
    assert adapter.num_labels == 4
    adapter.num_labels = 2
    assert adapter.num_labels == 2


def test_register_adapter_refuses_what_is_not_an_adapter_class():
    from attattr_fast import register_adapter
    from attattr_fast.adapters import EncoderAdapter

    for bad in (None, object, EncoderAdapter(tiny_classifier("bert"))):
        with pytest.raises(TypeError, match="subclass of EncoderAdapter"):
            register_adapter("SomeModel", bad)
    with pytest.raises(TypeError, match="model class or its name"):
        register_adapter(3, EncoderAdapter)
