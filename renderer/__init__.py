"""wanrender: Wan2.2 batch renderer."""
__version__ = "0.1.0"
