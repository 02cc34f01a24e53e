"""What the server itself can do in a round, for aggregators that need more than the
updates: a small clean root dataset (FLTrust, BackdoorIndicator), training from the global
model on it, and scratch copies of the model holding any client's weights (DeepSight's
probes, BackdoorIndicator's checks). It never touches the global model the loop holds."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from backdoors.attacks.base import Attack
from backdoors.config import TrainConfig
from backdoors.data.dataset import ArrayDataset
from backdoors.data.loader import Augment, Loader
from backdoors.execution import accelerated
from backdoors.federated.clients import LocalPlan, LocalTraining
from backdoors.federated.updates import FlatModel
from backdoors.seeds import SERVER_ROOT, stream
from backdoors.training.optim import make_optimizer


class ServerView:
    """A scratch model, the clean training set to draw a root dataset from, the global
    weights of the round being aggregated (`global_params`, `global_buffers`), the
    clients' optimizer settings (`tc`: `tc.lr` is their learning rate) and the test set."""

    def __init__(self, model: nn.Module, clean_train: ArrayDataset, honest: Attack,
                 tc: TrainConfig, test_loader: Loader, seed: int,
                 augment: Augment | None, device: torch.device) -> None:
        scratch = copy.deepcopy(model)
        self.flat = FlatModel(scratch)
        self.local = LocalTraining(self.flat, make_optimizer(scratch, tc), test_loader,
                                   tc.batch_size, device, augment, tc.max_batches,
                                   accelerated(scratch, tc, device, whole=False))
        self.clean_train, self.honest, self.tc = clean_train, honest, tc
        self.test_loader = test_loader  # held-out inputs for certificates (CRFL)
        self.seed, self.device = seed, device
        self.num_classes = getattr(model, "num_classes", None)
        self.input_shape = tuple(getattr(model, "input_shape", clean_train.images.shape[1:]))
        self.global_params = torch.empty(0)
        self.global_buffers = torch.empty(0)
        self._roots: dict[int, ArrayDataset] = {}

    def set_global(self, params: Tensor, buffers: Tensor) -> None:
        """The weights the round's clients started from (called by the loop)."""
        self.global_params, self.global_buffers = params, buffers

    def root_data(self, n: int) -> ArrayDataset:
        """`n` clean training rows drawn once per run from the server's own stream: the
        server's root dataset (FLTrust: "a small clean training dataset" collected by
        the service provider, 100 samples in the paper)."""
        if n not in self._roots:
            n = min(n, len(self.clean_train))
            idx = torch.randperm(len(self.clean_train), generator=stream(self.seed,
                                                                          SERVER_ROOT))[:n]
            ds = self.clean_train.subset(idx.sort().values)
            self._roots[n] = ds.to(self.device) if self.device.type != "cpu" else ds
        return self._roots[n]

    def train(self, data: ArrayDataset, epochs: int, lr: float, round_: int,
              attack: Attack | None = None, start: Tensor | None = None) -> Tensor:
        """The update of `epochs` of local training on `data` from the global weights (or
        from `start`), with `attack` (default honest training) and the clients' optimizer
        settings; the server's own random stream per round."""
        out = torch.empty_like(self.global_params)
        begin = (self.global_params if start is None else start, self.global_buffers)
        plan = LocalPlan(attack or self.honest, epochs, lr)
        self.local.train(data, begin, plan, stream(self.seed, SERVER_ROOT, round_), out)
        return out

    def model_with(self, params: Tensor) -> nn.Module:
        """The scratch model holding `params` and the global buffers, in eval mode. It is
        the same module on every call: use it before asking for the next one."""
        self.flat.write(params, self.global_buffers)
        return self.flat.model.eval()
