"""Shared fixtures: small random BERT / RoBERTa / ELECTRA classifiers and the built-in MiniLM model.

TRITON_INTERPRET=1 is set here, before any kernel module can be imported, when no GPU is present:
that is how the kernels run on a CPU-only machine.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

FAMILIES = ("bert", "roberta", "electra")


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` skip, saying why, where CUDA is absent (`pytest -m gpu` selects them)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (timings-free GPU checks)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def tiny_classifier(family: str = "bert", *, layers: int = 3, heads: int = 4, hidden: int = 32,
                    num_labels: int = 3, seed: int = 0, dtype=torch.float32, **config):
    """A small random *ForSequenceClassification in eval mode (vocabulary 100, 64 positions); `config`
    overrides settings of the transformers config."""
    import transformers as T

    torch.manual_seed(seed)
    common = dict(vocab_size=100, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=2 * hidden + 5, num_labels=num_labels, max_position_embeddings=160,
                  type_vocab_size=2, **config)  # fmt: skip
    if family == "bert":
        model = T.BertForSequenceClassification(T.BertConfig(**common))
    elif family == "roberta":
        model = T.RobertaForSequenceClassification(T.RobertaConfig(**common))
    elif family == "electra":
        model = T.ElectraForSequenceClassification(T.ElectraConfig(embedding_size=hidden // 2, **common))
    else:
        raise ValueError(family)
    return model.to(dtype).eval()


def padded_batch(model, lengths, seed: int = 1, pair_at: int | None = None):
    """(input_ids, attention_mask, token_type_ids) right-padded to max(lengths); segment 1 from pair_at."""
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    pad = model.config.pad_token_id
    ids = torch.randint(5, 100, (len(lengths), n), generator=g)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for b, m in enumerate(lengths):
        mask[b, :m] = 1
    ids[mask == 0] = pad
    types = torch.zeros_like(ids)
    if pair_at is not None:
        types[:, pair_at:] = 1
        types[mask == 0] = 0
    return ids, mask, types


@pytest.fixture(scope="session")
def builtin():
    """(model, tokenizer) of the built-in MiniLM sentiment classifier (loaded once)."""
    from attattr_fast.models import load_classifier

    return load_classifier(None)


WORDS = ("the a an and of to is was it this that film movie good great bad awful dull wonderful boring "
         "loved hated plot actors story not very too long short fun , . !").split()


def save_tiny_classifier(directory, family: str = "bert", max_positions: int = 160):
    """A tiny classifier with labels negative/positive and a word-level tokenizer, saved with save_pretrained."""
    from transformers import BertTokenizer

    model = tiny_classifier(family, num_labels=2)
    model.config.id2label = {0: "negative", 1: "positive"}
    model.config.label2id = {"negative": 0, "positive": 1}
    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    vocab += [f"w{i}" for i in range(model.config.vocab_size - len(vocab))]
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}, model_max_length=max_positions)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Path of a saved tiny BERT sentiment classifier (loads in well under a second)."""
    return save_tiny_classifier(tmp_path_factory.mktemp("tiny") / "bert")
