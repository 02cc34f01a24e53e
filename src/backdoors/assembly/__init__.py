"""Wiring: config -> components, the run datasets, the inner loop, the attack artifact."""
