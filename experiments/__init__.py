"""Experiments that use attnspec (not part of the installed package)."""
