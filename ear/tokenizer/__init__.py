"""Image tokenizers: pixels <-> token grids."""

from ear.tokenizer.base import Tokenizer

__all__ = ["Tokenizer"]
