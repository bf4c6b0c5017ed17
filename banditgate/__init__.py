"""banditgate: closed-loop model-serving gateway (shared contracts, config, local stack, CLI)."""

__version__ = "0.1.0"
