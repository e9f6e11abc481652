"""rr-ray: Reveal-and-Release unlearning on Ray."""
__version__ = "0.1.0"
