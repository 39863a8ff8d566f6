"""Wan2.1 and Wan2.2 video VAEs."""
