"""Robustness audit: attacks that try to bring a forgotten capability back (``rr-ray audit RUN``)."""
