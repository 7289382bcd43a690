"""mpvg: rebuild every result of "Maximizing the Position Embedding for Vision Transformers
with Global Average Pooling" (MPVG, AAAI 2025), from raw data to the published tables."""

__version__ = "0.1.0"
