"""tunelab: declarative, config-driven LLM fine-tuning, from a CSV to an evaluated GGUF."""

__version__ = "0.1.0"
