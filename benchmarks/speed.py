"""Training and evaluation speed per model x precision x channels_last x compile, and the
blind attack's cost over clean training, measured side by side in one process.

Each setting trains a fresh model with the project's own step (execution.Accelerated for
the forward, LossScaler for the optimizer step, the clean attack's backward) on random
uint8 images already on the device, as in-memory tasks hold them, and evaluates it with
metrics.evaluate's forward. Warm-up steps (which include compilation) are not timed;
CUDA work is synchronised around every timed span. Ratios are against the same model in
fp32, eager, default layout, so machine speed cancels out.

The blind/clean ratio is the time of one blind step (a triggered copy of the batch, two
losses, MGDA with `loss` normalisation) over one clean step, fp32 eager: what a blind
epoch costs relative to a clean one.

On a CPU the sizes are reduced (32x32 inputs, batch 32, a few steps, small widths, and
compilation only for simple_net in fp32 with the default layout: inductor needs a minute
or more per model and mode there); with CUDA the models are full width with batch 512
and every setting is also compiled.

    python benchmarks/speed.py [--models simple_net,resnet18] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import itertools
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from backdoors.attacks import ATTACKS, Attack
from backdoors.batch import Batch
from backdoors.execution import Accelerated, LossScaler
from backdoors.models import MODELS
from backdoors.synthesizers import SYNTHESIZERS

SHAPE, CLASSES = (3, 32, 32), 10
# Reduced widths for a CPU; None: the model's own default (full size).
CPU_MODELS: dict[str, dict[str, Any]] = {"simple_net": {}, "resnet18": {"width": 8},
                                         "preact_resnet18": {"width": 8}}


@dataclass(frozen=True)
class Setting:
    precision: str
    channels_last: bool
    compile: bool

    @property
    def label(self) -> str:
        return (f"{self.precision} | {'yes' if self.channels_last else 'no'} | "
                f"{'yes' if self.compile else 'no'}")


@dataclass(frozen=True)
class Sizes:
    batch: int
    warmup: int
    steps: int


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_model(name: str, kwargs: dict[str, Any], device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    model = MODELS.build(name, kwargs, "model", num_classes=CLASSES, input_shape=SHAPE,
                         mean=(0.5,) * 3, std=(0.25,) * 3)
    return model.to(device)


def batches(sizes: Sizes, device: torch.device) -> list[Batch]:
    """Random uint8 images on the device, turned into float pixels as the Loader does."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(sizes.warmup + sizes.steps):
        x = torch.randint(0, 256, (sizes.batch, *SHAPE), dtype=torch.uint8, generator=g)
        y = torch.randint(0, CLASSES, (sizes.batch,), generator=g)
        x = x.to(device).float().div_(255.0)
        out.append(Batch.make(x, y.to(device), torch.arange(sizes.batch, device=device)))
    return out


def timed(fn: Callable[[Batch], None], data: list[Batch], warmup: int,
          device: torch.device) -> float:
    """Seconds per call of `fn` over the batches after the first `warmup`."""
    for batch in data[:warmup]:
        fn(batch)
    sync(device)
    start = time.perf_counter()
    for batch in data[warmup:]:
        fn(batch)
    sync(device)
    return (time.perf_counter() - start) / max(1, len(data) - warmup)


def attack(name: str, model: torch.nn.Module) -> Attack:
    synth = SYNTHESIZERS.build("pattern", {"target": 1}, "synthesizer")
    synth.bind(SHAPE, CLASSES)
    built = ATTACKS.build(name, {}, "attack")
    built.bind(synth, model)
    built.start(model)
    return built


def train_step_seconds(name: str, kwargs: dict[str, Any], setting: Setting,
                       data: list[Batch], sizes: Sizes, device: torch.device,
                       attack_name: str = "none") -> tuple[float, float]:
    """(seconds per training step, seconds per evaluation batch) of one setting."""
    model = make_model(name, kwargs, device)
    forward = Accelerated(model, device, setting.precision, setting.channels_last,
                          setting.compile)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = LossScaler(setting.precision, device)
    step_attack = attack(attack_name, model)
    g = torch.Generator(device=device).manual_seed(0)

    def train(batch: Batch) -> None:
        optimizer.zero_grad(set_to_none=True)
        with scaler.scope():
            step_attack.backward(forward, batch, g)
        scaler.step(optimizer)

    model.train()
    train_s = timed(train, data, sizes.warmup, device)
    model.eval()

    @torch.no_grad()
    def evaluate(batch: Batch) -> None:
        forward(batch.inputs).argmax(1)

    eval_s = timed(evaluate, data, sizes.warmup, device)
    if forward.compile_fallback is not None:
        print(f"  ({name}: compile fell back to eager: {forward.compile_fallback})",
              file=sys.stderr)
    return train_s, eval_s


def precisions(device: torch.device) -> list[str]:
    """fp32, bf16, and fp16 where this device's autocast has it."""
    out = ["fp32"]
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        try:
            with torch.autocast(device.type, dtype=dtype):
                torch.ones(2, 2, device=device) @ torch.ones(2, 2, device=device)
            out.append(name)
        except (RuntimeError, ValueError):
            pass
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated registered model names "
                        "(default: simple_net, resnet18, preact_resnet18)")
    parser.add_argument("--compile-models", help="models to also time compiled, "
                        "comma-separated, or 'none' (default: all with CUDA, simple_net "
                        "on a CPU)")
    parser.add_argument("--steps", type=int, help="timed steps per setting")
    parser.add_argument("--out", type=Path, help="also write the table to this .md file")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    sizes = Sizes(batch=512, warmup=5, steps=args.steps or 50) if cuda else \
        Sizes(batch=32, warmup=2, steps=args.steps or 5)
    names = args.models.split(",") if args.models else list(CPU_MODELS)
    models = {n: ({} if cuda else CPU_MODELS.get(n, {})) for n in names}
    if args.compile_models:
        compiled = set() if args.compile_models == "none" else set(args.compile_models.split(","))
    else:
        compiled = set(names) if cuda else {"simple_net"}
    data = batches(sizes, device)
    machine = (torch.cuda.get_device_name(device) if cuda else
               f"{platform.processor() or platform.machine()} CPU, "
               f"{torch.get_num_threads()} threads")
    lines = [f"Machine: {machine}; torch {torch.__version__}; batch {sizes.batch} of "
             f"32x32x3, {sizes.steps} timed steps after {sizes.warmup} warm-up steps.", "",
             "| model | precision | channels_last | compile | train img/s | train x | "
             "eval img/s | eval x |", "|---|---|---|---|---:|---:|---:|---:|"]
    ratios = ["", "| model | clean step (ms) | blind step (ms) | blind / clean |",
              "|---|---:|---:|---:|"]
    for name, kwargs in models.items():
        label = name + "".join(f" {k}={v}" for k, v in kwargs.items())
        base: tuple[float, float] | None = None
        for precision, channels_last, use_compile in itertools.product(
                precisions(device), (False, True), (False, True)):
            # A CPU compiles one setting only: inductor takes minutes per setting there.
            if use_compile and (name not in compiled or
                                (not cuda and (precision != "fp32" or channels_last))):
                continue
            setting = Setting(precision, channels_last, use_compile)
            print(f"{label}: {setting.label}", file=sys.stderr, flush=True)
            train_s, eval_s = train_step_seconds(name, kwargs, setting, data, sizes, device)
            base = base or (train_s, eval_s)
            lines.append(f"| {label} | {setting.label} | {sizes.batch / train_s:,.0f} | "
                         f"{base[0] / train_s:.2f} | {sizes.batch / eval_s:,.0f} | "
                         f"{base[1] / eval_s:.2f} |")
        fp32 = Setting("fp32", False, False)
        blind_s, _ = train_step_seconds(name, kwargs, fp32, data, sizes, device, "blind")
        assert base is not None
        ratios.append(f"| {label} | {base[0] * 1e3:.1f} | {blind_s * 1e3:.1f} | "
                      f"{blind_s / base[0]:.2f} |")
    text = "\n".join(lines + ratios) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
