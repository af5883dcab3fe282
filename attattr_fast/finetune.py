"""Fine-tuning a BERT-family classifier on a labelled task (the standard GLUE recipe).

AdamW (no weight decay on biases and LayerNorm weights), peak learning rate 2e-5 … 5e-5 reached by a
linear warm-up over the first 10 % of the steps and decayed linearly to 0, weight decay 0.01,
gradient norm clipped at 1, 3 epochs, inputs truncated to 128 tokens, dropout on while training.
Batches are shuffled with a seeded generator and trimmed to their longest real length.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from attattr_fast.errors import AttAttrError
from attattr_fast.heads import LabelledInputs

log = logging.getLogger(__name__)


@dataclass
class FinetuneConfig:
    """Hyper-parameters (defaults: the recipe above)."""

    learning_rate: float = 3e-5
    epochs: int = 3
    batch_size: int = 16
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_length: int = 128
    max_grad_norm: float = 1.0
    seed: int = 0

    def check(self) -> None:
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise AttAttrError(f"learning rate must be positive, got {self.learning_rate}")
        for name in ("epochs", "batch_size", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AttAttrError(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise AttAttrError(f"warm-up ratio must be in [0, 1), got {self.warmup_ratio}")
        if not self.weight_decay >= 0.0:
            raise AttAttrError(f"weight decay must be non-negative, got {self.weight_decay}")


@dataclass
class EpochReport:
    """One epoch: mean training loss, running training accuracy (dropout on) and held-out accuracy
    (eval mode; None without held-out data). Epoch 0 is the model before training."""

    epoch: int
    train_loss: float | None
    train_accuracy: float | None
    eval_accuracy: float | None


def warmup_linear_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """The learning-rate multiplier after `step` optimizer steps: 0 → 1 linearly over the warm-up, then 1 → 0."""
    if step < warmup_steps:
        return step / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: biases and LayerNorm weights (every 1-d parameter) are not decayed."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _logits(model: torch.nn.Module, batch: LabelledInputs) -> torch.Tensor:
    device = next(model.parameters()).device
    types = None if batch.token_type_ids is None else batch.token_type_ids.to(device)
    return model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                 token_type_ids=types).logits  # fmt: skip


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: LabelledInputs, batch_size: int = 64) -> float:
    """Accuracy of the model's own forward (eval mode) on `data`."""
    was_training = model.training
    model.eval()
    lengths = data.attention_mask.sum(1)
    order = torch.sort(lengths, stable=True).indices
    correct = 0
    for idx in torch.split(order, batch_size):
        batch = data.subset(idx)
        correct += int((_logits(model, batch).argmax(-1).cpu() == batch.labels).sum())
    model.train(was_training)
    return correct / len(data)


def finetune(
    model: torch.nn.Module,
    train: LabelledInputs,
    held_out: LabelledInputs | None = None,
    config: FinetuneConfig | None = None,
    progress: bool = True,
    on_epoch: Callable[[EpochReport], None] | None = None,
) -> list[EpochReport]:
    """Train every parameter of `model` on `train` in place; returns one report per epoch (0 = before).

    Args:
        model: a *ForSequenceClassification whose head has as many classes as the labels use.
        train, held_out: encoded examples with class indices (`heads.encode_labelled`).
        config: hyper-parameters (None: the defaults of `FinetuneConfig`).
        progress: a tqdm bar per epoch with the running loss and accuracy.
        on_epoch: called with each report as soon as it is known.
    """
    from tqdm.auto import tqdm

    config = config or FinetuneConfig()
    config.check()
    num_labels = int(model.config.num_labels)
    for name, data in (("training", train), ("held-out", held_out)):
        if data is not None and bool(((data.labels < 0) | (data.labels >= num_labels)).any()):
            raise AttAttrError(f"{name} labels out of range for a model with {num_labels} classes")
    if len(train) == 0:
        raise AttAttrError("no training examples")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    trainable = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(True)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    # the schedule's first step has rate 0, so a run of one step takes no warm-up
    warmup_steps = min(math.ceil(config.warmup_ratio * total_steps), total_steps - 1)
    optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_linear_factor(step, total_steps, warmup_steps)
    )
    log.info("fine-tuning: %d examples, %d steps (%d warm-up), %s", len(train), total_steps, warmup_steps,
             asdict(config))  # fmt: skip

    reports = [EpochReport(0, None, None, None if held_out is None else evaluate(model, held_out))]
    if on_epoch is not None:
        on_epoch(reports[0])
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = torch.randperm(len(train), generator=generator)
        loss_sum, correct, seen = 0.0, 0, 0
        with tqdm(total=len(train), desc=f"epoch {epoch}/{config.epochs}", unit="ex", disable=not progress) as bar:
            for idx in torch.split(order, config.batch_size):
                batch = train.subset(idx)
                logits = _logits(model, batch)
                labels = batch.labels.to(logits.device)
                loss = F.cross_entropy(logits.float(), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                schedule.step()
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    raise AttAttrError(f"training diverged in epoch {epoch}: the loss is {loss_value}; lower the "
                                       "learning rate")  # fmt: skip
                loss_sum += loss_value * len(idx)
                correct += int((logits.argmax(-1) == labels).sum())
                seen += len(idx)
                bar.update(len(idx))
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
        model.eval()
        report = EpochReport(epoch, loss_sum / seen, correct / seen,
                             None if held_out is None else evaluate(model, held_out))  # fmt: skip
        reports.append(report)
        if on_epoch is not None:
            on_epoch(report)
    model.eval()
    for p, flag in zip(model.parameters(), trainable):
        p.requires_grad_(flag)
    with torch.no_grad():  # weights blown up by the last steps give NaN logits with a finite last loss
        if not bool(torch.isfinite(_logits(model, train.subset(torch.arange(min(len(train), 8))))).all()):
            raise AttAttrError("training diverged: the trained model's outputs are not finite; lower the "
                               "learning rate")  # fmt: skip
    return reports
