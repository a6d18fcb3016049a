"""The single-process offline trainer loop and the signal analysis."""
