"""The store: the bus between agents and controller (observed samples, desired targets)."""
