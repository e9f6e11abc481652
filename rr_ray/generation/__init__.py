"""Generation backends (hf, vllm) behind one interface, and the Ray actor pool over them."""

from rr_ray.generation.base import Completion, Generator, Request, SamplingParams, make_generator

__all__ = ["Completion", "Generator", "Request", "SamplingParams", "make_generator"]
