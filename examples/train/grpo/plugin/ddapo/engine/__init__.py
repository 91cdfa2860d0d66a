"""The engine: the forward scheduler and the attention capture (pure torch)."""
