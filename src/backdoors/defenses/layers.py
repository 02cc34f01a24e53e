"""Generic layer discovery for repair defenses, for every model in backdoors.models.

Two questions come up again and again: "where are the outputs of the model's main blocks?"
(NAD distils attention there) and "which layers have neurons to mask?" (ANP). Both are
answered from the module tree and one dry run, without per-model tables, so a new model
is covered the day it is registered.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


def _leaves(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    """`module` with every nn.Sequential opened up, in execution order: ResNet stages,
    stems and plain conv stacks all become one flat list of blocks and layers."""
    if not isinstance(module, nn.Sequential):
        return [(prefix, module)]
    out = []
    for name, child in module.named_children():
        out += _leaves(child, f"{prefix}.{name}" if prefix else name)
    return out


def stage_outputs(model: nn.Module, input_shape: tuple[int, ...]
                  ) -> list[tuple[str, nn.Module]]:
    """The modules whose outputs end each resolution stage of `model.body` (of the model
    itself when it has no body), found with a dry run on one input of `input_shape`.

    The body is flattened into its blocks (`_leaves`) and the dry run records each block's
    output size; consecutive blocks with the same spatial size form a stage, and a stage's
    last block is its output. Stages without a convolution (a lone
    pooling layer) only resample the previous stage and are skipped, as are 1x1 maps,
    where an attention map is a constant. The result is the residual-group outputs of the
    ResNets (NAD's choice), the last ReLU before each pooling of VGG, simple_net and
    tiny_cnn, and PreAct's final BN-ReLU.
    """
    body = getattr(model, "body", model)
    leaves = _leaves(body, "body" if body is not model else "")
    shapes = dict(enumerate(output_shapes(model, [m for _, m in leaves], input_shape)))
    stages: list[list[int]] = []
    for i in range(len(leaves)):
        size = shapes[i][1:] if len(shapes[i]) == 3 else None
        if stages and size is not None and shapes[stages[-1][-1]][1:] == size:
            stages[-1].append(i)
        elif size is not None:
            stages.append([i])
    chosen = []
    for stage in stages:
        has_conv = any(isinstance(m, nn.Conv2d) for i in stage for m in leaves[i][1].modules())
        if has_conv and max(shapes[stage[-1]][1:]) > 1:
            chosen.append(leaves[stage[-1]])
    return chosen


def neuron_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every Conv2d (its output channels are neurons) and every Linear but the classifier
    head (its units are neurons), in module order, with their qualified names."""
    head = getattr(model, "head", None)
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) or (isinstance(m, nn.Linear) and m is not head)]


def output_shapes(model: nn.Module, modules: list[nn.Module], input_shape: tuple[int, ...]
                  ) -> list[tuple[int, ...]]:
    """Per-sample output shape of each of `modules` (batch dimension dropped), from one
    dry run of `model` in eval mode on a zero input of `input_shape`; () for a module the
    run does not reach or whose output is not a tensor."""
    shapes: list[tuple[int, ...]] = [() for _ in modules]

    def recorder(index: int):  # noqa: ANN202 - a forward hook
        def record(_module: nn.Module, _inputs: object, output: object) -> None:
            if isinstance(output, Tensor):
                shapes[index] = tuple(output.shape[1:])
        return record

    hooks = [m.register_forward_hook(recorder(i)) for i, m in enumerate(modules)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=_device(model)))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return shapes


@contextmanager
def capture(modules: list[nn.Module]) -> Iterator[list[Tensor]]:
    """Within the block, every forward pass appends the outputs of `modules` (graph kept)
    to the yielded list, in execution order; the caller clears it between passes."""
    outputs: list[Tensor] = []

    def record(_module: nn.Module, _inputs: object, output: Tensor) -> None:
        outputs.append(output)

    handles = [m.register_forward_hook(record) for m in modules]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
