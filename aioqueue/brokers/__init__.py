"""Transports: memory (in-process), Redis lists. See base.py for the seam."""
