"""Neural Attention Distillation: a fine-tuned teacher's attention maps guide the student."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backdoors.defenses.base import DEFENSES, DefenseData, ModelRepair
from backdoors.defenses.layers import capture, stage_outputs
from backdoors.defenses.results import Repaired
from backdoors.defenses.training import ExtraLoss, accuracy, finetune
from backdoors.errors import ConfigError, did_you_mean


def attention_map(activation: Tensor, p: float = 2.0) -> Tensor:
    """NAD's attention: the channel mean of |a|^p, flattened and L2-normalised per sample.
    (The paper sums over channels; the normalisation makes sum and mean the same map.)"""
    return F.normalize(activation.abs().pow(p).mean(1).flatten(1), dim=1)


def attention_loss(student: Tensor, teacher: Tensor, p: float = 2.0) -> Tensor:
    """Mean squared difference of the two attention maps (over samples and positions)."""
    return F.mse_loss(attention_map(student, p), attention_map(teacher, p))


@DEFENSES.register("nad")
class NAD(ModelRepair):
    """Neural Attention Distillation (arXiv 2101.05930).

    Li, Lyu, Koren, Lyu, Li, Ma, "Neural Attention Distillation: Erasing Backdoor Triggers
    from Deep Neural Networks" (ICLR 2021).

    A copy of the backdoored model is fine-tuned on the clean budget into the teacher (its
    backdoor is weakened, its attention on clean inputs is sound); then the backdoored model
    itself, the student, is fine-tuned on the same data with cross-entropy plus `beta` x
    the attention-distillation loss at each attention layer: the mean squared difference
    of the L2-normalised attention maps (channel mean of |a|^`p`) of student and teacher.

    Attention layers: the outputs of the model's resolution stages
    (`layers.stage_outputs`: the residual groups of ResNets, the last ReLU before each
    pooling of VGG, simple_net and tiny_cnn), or the module names given in `layers`.

    Defaults are the paper's (its code's) where they transfer: `epochs` 20 for the student,
    `teacher_epochs` 10, SGD with Nesterov momentum 0.9, weight decay 1e-4, `batch_size`
    64, the learning rate divided by 10 after `lr_drop_epoch` 2, `beta` 5000, `p` 2. The
    paper's code weights only its last group by default; here every attention layer gets
    `beta`. Learning rates: the paper's 0.1 for both (set for BN networks) wrecks BN-free
    simple_net on MNIST (clean accuracy 98% -> 10%), so `lr` 0.01 for the student and
    `teacher_lr` 0.05 for the teacher. The teacher must forget part of the backdoor for
    there to be something to distil: at 0.01 it keeps 98% ASR and the student of the
    data-poisoning attack 21%; at 0.05 the teacher keeps 64-76% and the student 2-3%. No
    augmentation (the paper's teacher fine-tuning uses flips and crops).
    """

    def __init__(
        self,
        epochs: int = 20,
        teacher_epochs: int = 10,
        teacher_lr: float = 0.05,
        lr: float = 0.01,
        lr_drop_epoch: int = 2,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        batch_size: int = 64,
        beta: float = 5000.0,
        p: float = 2.0,
        layers: list[str] | None = None,
        **base: Any,
    ) -> None:
        super().__init__(**base)
        if epochs < 0 or teacher_epochs < 0:
            raise ValueError("epochs and teacher_epochs must be >= 0")
        if lr <= 0 or batch_size < 1 or lr_drop_epoch < 0:
            raise ValueError("lr must be > 0, batch_size >= 1 and lr_drop_epoch >= 0")
        if beta < 0 or p <= 0:
            raise ValueError(f"beta must be >= 0 and p > 0, got beta={beta}, p={p}")
        if layers is not None and not layers:
            raise ValueError("layers must name at least one module (or be null: automatic)")
        if teacher_lr <= 0:
            raise ValueError(f"teacher_lr must be > 0, got {teacher_lr}")
        self.epochs, self.teacher_epochs, self.lr = epochs, teacher_epochs, lr
        self.teacher_lr = teacher_lr
        self.lr_drop_epoch, self.momentum, self.weight_decay = lr_drop_epoch, momentum, weight_decay
        self.batch_size, self.beta, self.p, self.layers = batch_size, beta, p, layers

    def attention_layers(self, model: nn.Module, data: DefenseData) -> list[tuple[str, nn.Module]]:
        """(name, module) pairs whose outputs are distilled."""
        if self.layers is None:
            return stage_outputs(model, data.input_shape)
        modules = dict(model.named_modules())
        for name in self.layers:
            if name not in modules:
                raise ConfigError(f"defense 'nad': layers names '{name}', which the model "
                                  f"does not have{did_you_mean(name, modules)}")
        return [(name, modules[name]) for name in self.layers]

    def _train(self, model: nn.Module, data: DefenseData, epochs: int, lr: float,
               extra: ExtraLoss | None = None) -> None:
        finetune(model, data.clean, data, epochs, lr, self.momentum, self.weight_decay,
                 self.batch_size, nesterov=True, lr_drop_epoch=self.lr_drop_epoch,
                 extra_loss=extra)

    def repair(self, model: nn.Module, data: DefenseData) -> Repaired:
        student = copy.deepcopy(model)
        teacher = copy.deepcopy(model)
        # The teacher: the same fine-tuning without distillation (the paper's beta = 0).
        self._train(teacher, data, self.teacher_epochs, self.teacher_lr)
        teacher.eval().requires_grad_(False)
        names = [name for name, _ in self.attention_layers(student, data)]
        by_name = dict(student.named_modules())
        t_by_name = dict(teacher.named_modules())
        with capture([by_name[n] for n in names]) as s_out, \
                capture([t_by_name[n] for n in names]) as t_out:

            def distill(x: Tensor) -> Tensor:
                # s_out holds the student's activations from the forward pass on x.
                t_out.clear()
                with torch.no_grad():
                    teacher(x)
                loss = sum(attention_loss(s, t, self.p) for s, t in zip(s_out, t_out, strict=True))
                s_out.clear()
                return self.beta * loss

            s_out.clear()
            self._train(student, data, self.epochs, self.lr, distill)
        return Repaired(model=student, figures={
            "attention_layers": names,
            "clean_budget_accuracy_teacher": accuracy(teacher, data.clean, data),
            "clean_budget_accuracy_after": accuracy(student, data.clean, data),
        })
