"""Policies shipped with the provider: the starter policy written by ``governed-ai policy init``."""
