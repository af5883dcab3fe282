"""Loading classifiers offline, and the built-in MiniLM sentiment model."""

import pytest
import torch

from attattr_fast import AttAttrError, UnsupportedModelError, adapter_for, load_classifier
from attattr_fast.datasets import builtin_sentiment_examples

from tolerances import ADAPTER_ATOL


def test_builtin_model_is_accurate_on_the_labelled_sentences(builtin):
    model, tokenizer = builtin
    examples = builtin_sentiment_examples()
    labels = [e.label for e in examples]
    assert len(examples) >= 40 and labels.count("positive") == labels.count("negative")
    enc = tokenizer([e.text for e in examples], padding=True, return_tensors="pt")
    with torch.no_grad():
        pred = model(**enc).logits.argmax(-1)
    gold = torch.tensor([model.config.label2id[label] for label in labels])
    accuracy = (pred == gold).float().mean().item()
    assert accuracy >= 0.9, accuracy


@pytest.mark.parametrize("text, label", [
    ("An outstanding, beautiful film. I loved it and will watch it again.", "positive"),
    ("A terrible, boring mess. I hated every minute of it.", "negative"),
])  # fmt: skip
def test_builtin_model_calls_obvious_reviews_right(builtin, text, label):
    model, tokenizer = builtin
    with torch.no_grad():
        probs = model(**tokenizer([text], return_tensors="pt")).logits.softmax(-1)[0]
    assert model.config.id2label[int(probs.argmax())] == label
    assert probs.max() > 0.8


def test_builtin_adapter_reproduces_the_model(builtin):
    model, tokenizer = builtin
    enc = tokenizer(["Short.", "A longer sentence, padded batch."], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**enc).logits
    adapter = adapter_for(model)
    assert not adapter.reads_first_token_only  # mean pooling reads every position
    got = adapter.forward(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    # logits are temperature × cosine, so compare at the cosine's scale
    torch.testing.assert_close(got / model.temperature, expected / model.temperature, atol=ADAPTER_ATOL, rtol=0)


def test_load_saved_classifier(tiny_model_dir):
    model, tokenizer = load_classifier(tiny_model_dir)
    assert type(model).__name__ == "BertForSequenceClassification" and not model.training
    assert model.config.id2label[1] == "positive"
    assert tokenizer.convert_ids_to_tokens(tokenizer("good film")["input_ids"]) == ["[CLS]", "good", "film", "[SEP]"]


def test_unknown_path_and_not_a_model(tmp_path):
    with pytest.raises(AttAttrError, match="no model at"):
        load_classifier(tmp_path / "missing")
    with pytest.raises(AttAttrError, match="no model at|cannot read"):
        load_classifier(tmp_path)


def test_unsupported_family_directory(tmp_path):
    import transformers as T

    T.DistilBertForSequenceClassification(T.DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2,
                                                             hidden_dim=32)).save_pretrained(tmp_path)  # fmt: skip
    with pytest.raises(UnsupportedModelError, match="unsupported model family 'distilbert'"):
        load_classifier(tmp_path)


def test_encoder_without_head_needs_num_labels(tmp_path, tiny_model_dir):
    import shutil

    import transformers as T

    T.BertModel(T.BertConfig.from_pretrained(tiny_model_dir)).save_pretrained(tmp_path)
    for name in ("vocab.txt", "tokenizer_config.json", "tokenizer.json", "special_tokens_map.json"):
        if (tiny_model_dir / name).exists():
            shutil.copy(tiny_model_dir / name, tmp_path / name)
    with pytest.raises(AttAttrError, match="no trained classification head"):
        load_classifier(tmp_path)
    model, _ = load_classifier(tmp_path, num_labels=4)
    assert model.config.num_labels == 4


def test_a_file_path_and_a_bad_class_count_are_one_line_errors(tiny_model_dir, capsys):
    from attattr_fast.cli import main

    with pytest.raises(AttAttrError, match="is a file; give the directory"):
        load_classifier(tiny_model_dir / "config.json")
    for bad in (0, -1, "2", True):
        with pytest.raises(AttAttrError, match="num_labels must be an integer of at least 2"):
            load_classifier(tiny_model_dir, num_labels=bad)
    assert main(["attribute", "--model", str(tiny_model_dir / "config.json"), "--text", "good film"]) == 2
    err = capsys.readouterr().err
    assert "is a file" in err and err.count("\n") == 1, err
