"""Reveal (paper section 3.1, Algorithm 1): forget data the model generates under optimised instructions."""
