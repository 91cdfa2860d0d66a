"""The ms-swift side: the only modules that import ms-swift or reach private names of ms-swift, transformers or
accelerate."""
