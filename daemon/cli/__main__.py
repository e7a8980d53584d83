"""``python -m wattkeeper.cli``, as the single-module CLI allowed."""

from wattkeeper.cli import main

main()
