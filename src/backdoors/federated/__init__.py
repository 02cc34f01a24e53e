"""Federated learning: data splits, client training, aggregators (pure rules in
`aggregation.py`, registered adapters in `aggregators.py`) and the round loop
(`simulation.py`). See docs/federated.md."""
