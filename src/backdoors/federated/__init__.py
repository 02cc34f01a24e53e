"""Federated learning: aggregation rules (pure functions over client updates)."""
