"""Result backends: memory (in-process), Redis. See base.py for the seam."""
