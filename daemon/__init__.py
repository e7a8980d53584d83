"""wattkeeper: keeps a GPU facility inside its power budget at the best tokens per joule."""

__version__ = "0.1.0"
