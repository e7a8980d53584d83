"""Decisions: pure functions from a snapshot of the fleet and its budgets to targets, no I/O."""
