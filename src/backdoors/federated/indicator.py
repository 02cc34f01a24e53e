"""BackdoorIndicator (Li & Dai, "BackdoorIndicator: Leveraging OOD Data for Proactive
Backdoor Detection in Federated Learning", USENIX Security 2024, arXiv 2405.20862).

Before each round the server plants its own backdoor, the indicator task, into the global
model: out-of-distribution samples labelled with the main task's classes. The clients
start from the planted model. Benign training erodes the indicator; a backdoor attacker's
training keeps it alive, because planting a backdoor helps earlier backdoors with the
same target label survive (the paper's observation), and backdoor samples are OOD like
the indicator's. The server flags every update whose local model (planted global + update)
still classifies the indicator samples of some label with accuracy >= the threshold.

As in the official code, the indicator is planted into the global model itself: the
clients train from it and the accepted updates are added to it, so the next round starts
from a model that still carries the fading indicator and plants it again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from backdoors.data.dataset import ArrayDataset
from backdoors.federated import aggregation as rules
from backdoors.federated.aggregator import AGGREGATORS, Aggregate, Aggregator, RoundContext
from backdoors.seeds import SERVER_PROBE, stream

if TYPE_CHECKING:
    from backdoors.federated.server import ServerView


def out_of_distribution(images: Tensor, noise: float, generator: torch.Generator) -> Tensor:
    """uint8 images made OOD for the task: intensities inverted, then mixed with a share
    `noise` of uniform noise (the official code mixes 20% Gaussian noise into its OOD
    dataset's images)."""
    inverted = 255.0 - images.float()
    rand = torch.rand(images.shape, generator=generator) * 255.0
    return ((1 - noise) * inverted + noise * rand.to(images.device)).round().to(torch.uint8)


def indicator_labels(n: int, classes: int, generator: torch.Generator) -> Tensor:
    """Labels spread evenly over the classes, shuffled (as the official code assigns its
    OOD samples' labels)."""
    return (torch.arange(n) % classes)[torch.randperm(n, generator=generator)]


def label_accuracies(predictions: Tensor, labels: Tensor, classes: int) -> Tensor:
    """Accuracy per indicator label [classes] (0 for a label with no sample)."""
    hits = torch.zeros(classes, dtype=torch.float64)
    counts = torch.zeros(classes, dtype=torch.float64)
    hits.index_add_(0, labels.cpu(), (predictions.cpu() == labels.cpu()).double())
    counts.index_add_(0, labels.cpu(), torch.ones(len(labels), dtype=torch.float64))
    return hits / counts.clamp(min=1)


def keeps_indicator(accuracies: Tensor, threshold: float) -> Tensor:
    """Flags [K] from per-label indicator accuracies [K, C]: the best label's accuracy is
    >= threshold (the official code's per-label test, max over labels)."""
    return accuracies.max(1).values >= threshold


@torch.no_grad()
def predict(model: nn.Module, data: ArrayDataset, batch: int = 512) -> Tensor:
    """Predicted classes of `data` (pixels scaled to [0, 1] as the loader does)."""
    return torch.cat([model(data.images[i:i + batch].float().div(255.0)).argmax(1)
                      for i in range(0, len(data), batch)])


@AGGREGATORS.register("indicator")
class BackdoorIndicator(Aggregator):
    """BackdoorIndicator: plant an OOD indicator, flag updates that keep it (arXiv 2405.20862).

    Li & Dai, USENIX Security 2024. Each round from `start_round` (default 1; the official
    CIFAR configs start at round 100 of a pre-trained model) the server trains the global
    model for `epochs` on `samples` indicator samples (official: 800 OOD samples, 50
    epochs at lr 0.0008 with momentum 0.9 and an L2 pull to the global model; defaults
    here 200 samples, 20 epochs at lr 0.001 with the clients' optimizer settings, no L2
    pull, for CPU runs: at lr 0.01 the planting diverged from a model a boosted attacker
    had just replaced). Indicator samples: the server's root data with intensities
    inverted and `noise` (default 0.2, as the official mix) uniform noise, labels spread
    over the classes (the paper takes another dataset; none is assumed here). Flags an
    update when its model's accuracy on the indicator samples of its best label is >=
    `threshold` (official 0.85); the rest are averaged (FedAvg, sample-weighted)."""

    flags_clients = True
    needs_server = True

    def __init__(self, samples: int = 200, epochs: int = 20, lr: float = 0.001,
                 threshold: float = 0.85, noise: float = 0.2, start_round: int = 1) -> None:
        if samples < 1 or epochs < 1 or start_round < 1:
            raise ValueError(f"samples, epochs and start_round must be >= 1, got {samples}, "
                             f"{epochs} and {start_round}")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not 0 < threshold <= 1 or not 0 <= noise < 1:
            raise ValueError(f"threshold must be in (0, 1] and noise in [0, 1), got "
                             f"{threshold} and {noise}")
        self.samples, self.epochs, self.lr = samples, epochs, lr
        self.threshold, self.noise, self.start_round = threshold, noise, start_round
        self._data: ArrayDataset | None = None

    def indicator_data(self, server: ServerView) -> ArrayDataset:
        """The indicator samples, made once from the server's root data and its own
        stream (so a resumed run makes the same ones)."""
        if self._data is None:
            root = server.root_data(self.samples)
            g = stream(server.seed, SERVER_PROBE)
            images = out_of_distribution(root.images, self.noise, g)
            labels = indicator_labels(len(root), int(server.num_classes or 0), g)
            self._data = ArrayDataset(images, labels.to(images.device))
        return self._data

    def _server(self, ctx: RoundContext) -> ServerView:
        if ctx.server is None or not ctx.server.num_classes:
            raise ValueError("indicator needs the server view and a classifier model")
        return ctx.server

    def before_round(self, ctx: RoundContext) -> Tensor | None:
        if ctx.round < self.start_round:
            return None
        server = self._server(ctx)
        update = server.train(self.indicator_data(server), self.epochs, self.lr, ctx.round)
        return server.global_params + update

    def indicator_accuracies(self, server: ServerView, updates: Tensor) -> Tensor:
        """[K, C] per-label indicator accuracy of each planted global + update."""
        data = self.indicator_data(server)
        classes = int(server.num_classes or 0)
        return torch.stack([label_accuracies(
            predict(server.model_with(server.global_params + u), data), data.labels, classes)
            for u in updates])

    def aggregate(self, updates: Tensor, ctx: RoundContext) -> Aggregate:
        k = len(updates)
        flagged = torch.zeros(k, dtype=torch.bool, device=updates.device)
        if ctx.round >= self.start_round:
            server = self._server(ctx)
            accuracies = self.indicator_accuracies(server, updates)
            flagged = keeps_indicator(accuracies, self.threshold).to(updates.device)
        mean_update, coef = rules.accepted_mean(updates, ctx.samples, ~flagged)
        return Aggregate(ctx.step(mean_update, k), coef, flagged)
