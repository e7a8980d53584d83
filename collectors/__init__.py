"""Readers of the outside world: GPU backends, inference-server token sources, the host."""
