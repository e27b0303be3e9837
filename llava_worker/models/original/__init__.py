"""Checkpoints in the original haotian-liu/LLaVA layout, made into their transformers equivalents."""
