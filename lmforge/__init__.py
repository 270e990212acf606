"""lmforge: raw text in, a trained Transformer out."""

__version__ = "0.1.0"
