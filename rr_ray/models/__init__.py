"""Model references: packaged default, local directories, s3:// URIs and hub ids."""

from rr_ray.models.loader import apply_chat, load_model, load_tokenizer, resolve_model
from rr_ray.models.packaged import ModelNotFoundError

__all__ = ["ModelNotFoundError", "apply_chat", "load_model", "load_tokenizer", "resolve_model"]
