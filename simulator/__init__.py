"""wattkeeper.simulator."""
