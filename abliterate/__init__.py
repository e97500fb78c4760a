"""abliterate: measure a chat model's refusal direction and remove it from the weights."""

__version__ = "0.1.0"
