"""Wan2.2-Animate-14B: character animation and replacement (the DiT, its face path, checkpoints, conditioning)."""
