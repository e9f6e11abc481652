"""Unlearning methods as plugins (``rr_ray.plugins.METHODS``), run side by side by ``rr-ray compare``."""
