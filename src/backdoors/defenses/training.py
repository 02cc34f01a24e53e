"""Shared helpers for repair defenses: fine-tune a model on a dataset, measure accuracy.

Fine-tuning follows BackdoorBench's defaults (SGD, lr 0.01, momentum 0.9, weight decay
5e-4). Batches are indexed from the in-memory dataset (no per-sample Python) and shuffled
with the defense's generator, so a repair is reproducible for a given run seed.
Fine-tuning runs in the run's precision (DefenseData.precision): the forward under the
project's autocast, fp16 with a loss scaler (backdoors.execution). Defenses with their
own loops do the same through the same helpers; passes whose gradients a defense takes
itself (`unscaled_precision`) run in bf16 or fp32, never unscaled fp16.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backdoors.data.dataset import Dataset
from backdoors.data.loader import Loader
from backdoors.defenses.base import DefenseData
from backdoors.execution import Accelerated, LossScaler

# Rewrites a training batch (inputs, labels) -> (inputs, labels); e.g. Neural Cleanse's
# unlearning pastes reversed triggers onto some rows but keeps their true labels.
BatchTransform = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
# A loss term added to the cross-entropy, called with the batch's inputs right after the
# model's forward pass on them (so forward hooks have fired); e.g. NAD's attention loss.
ExtraLoss = Callable[[Tensor], Tensor]


def unscaled_precision(precision: str) -> str:
    """The precision for forward passes whose gradients a defense takes itself, with no
    loss scale (torch.autograd.grad, signed or clipped steps, hypergradients): the run's,
    except fp16, whose small gradients would underflow there unscaled, so fp32. bf16 has
    fp32's exponent range and needs no scale."""
    return "fp32" if precision == "fp16" else precision


def finetune(
    model: nn.Module,
    dataset: Dataset,
    data: DefenseData,
    epochs: int = 10,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    batch_size: int | None = None,
    transform: BatchTransform | None = None,
    *,
    nesterov: bool = False,
    lr_drop_epoch: int | None = None,
    extra_loss: ExtraLoss | None = None,
) -> nn.Module:
    """Train `model` in place on `dataset` with SGD and cross-entropy; return it in eval mode.

    `batch_size` defaults to `data.batch_size`; `transform` may rewrite each batch;
    from epoch `lr_drop_epoch` on (0-based) the learning rate is `lr / 10`; `extra_loss(x)`
    is added to the cross-entropy of each batch.
    """
    loader = Loader(dataset, batch_size or data.batch_size, data.device, shuffle=True,
                    generator=data.generator)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                nesterov=nesterov)
    forward = Accelerated(model, data.device, data.precision)
    scaler = LossScaler(data.precision, data.device)
    model.train()
    for epoch in data.progress.phase(range(epochs), f"fine-tuning on {len(dataset)} images"):
        if lr_drop_epoch is not None and epoch == lr_drop_epoch:
            for group in optimizer.param_groups:
                group["lr"] = lr / 10
        for batch in loader:
            x, y = batch.inputs, batch.labels
            if transform is not None:
                x, y = transform(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(forward(x), y)
            if extra_loss is not None:
                loss = loss + extra_loss(x)
            scaler.backward(loss)
            scaler.step(optimizer)
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, dataset: Dataset, data: DefenseData,
            fn: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """`fn(x)` (default: the model's logits) over the whole dataset in eval mode, batched;
    returns (outputs concatenated in dataset order, labels), both on the CPU."""
    was_training = model.training
    model.eval()
    fn = fn or model
    outs, labels = [], []
    for batch in data.loader(dataset):
        outs.append(fn(batch.inputs).cpu())
        labels.append(batch.labels.cpu())
    model.train(was_training)
    return torch.cat(outs), torch.cat(labels)


def accuracy(model: nn.Module, dataset: Dataset, data: DefenseData) -> float:
    """Top-1 accuracy of `model` on `dataset` (per sample)."""
    logits, labels = predict(model, dataset, data)
    return float((logits.argmax(1) == labels).double().mean()) if len(labels) else float("nan")
