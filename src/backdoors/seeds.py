"""Independent random streams derived from a run's seed.

Each consumer of randomness draws from its own stream, so changing one part of a run
(the number of evaluation batches, say) never shifts another (the poison subset). A
stream is named by a kind and, where one kind needs many streams (a round, a client),
by keys: `stream(seed, CLIENT, round, participant)`.
"""

from __future__ import annotations

import torch

# Kinds of stream. Centralized training:
POISON, TRAIN, EVAL, TRIGGER, DP_NOISE = 1, 2, 3, 4, 5
# Defenses:
CLEAN_BUDGET, DEFENSE = 11, 12
# Federated learning:
PARTITION, SAMPLE, CLIENT, SERVER, SERVER_ROOT, ATTACKER = 21, 22, 23, 24, 25, 26
# The server's probes of client models (DeepSight's random inputs, BackdoorIndicator's data):
SERVER_PROBE = 27

_FOLD, _MODULUS = 1_000_003, 2**63 - 1


def derive(seed: int, kind: int, *keys: int) -> int:
    """The integer seed of a stream. Without keys it is `seed * 1000 + kind`, the rule
    every figure published with this project was measured under; keys are folded in
    with a large prime so (round, participant) pairs never collide. Config seeds are
    below 2^32 (config/native.py), so every derived seed fits torch's 64-bit seed."""
    value = seed * 1000 + kind
    for key in keys:
        value = (value * _FOLD + key) % _MODULUS
    return value


def stream(seed: int, kind: int, *keys: int) -> torch.Generator:
    """A fresh CPU generator for the stream (seed, kind, *keys)."""
    return torch.Generator().manual_seed(derive(seed, kind, *keys))
