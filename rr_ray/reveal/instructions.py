"""Soft prompt -> instruction (InstructZero/INSTINCT style, DESIGN.md "Mechanics"; paper section 3.1).

A candidate is a Sobol point z in [-1, 1]^d (d = reveal.intrinsic_dim). A fixed, seeded random linear map
A turns z into ``soft_tokens`` input embeddings, each rescaled to the mean norm of the model's token
embeddings so the soft prompt looks like ordinary input to the model. The white-box model reads

    "<exemplars drawn from C> ..." + [soft prompt] + "The instruction was to"

and greedily decodes the rest of that sentence: the candidate's instruction. The last-token hidden state
of the same input is the candidate's feature vector for NeuralUCB, so both come out of one
``generate`` call (its prefill step). All candidates share the text, so a batch needs no padding.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.stats import qmc

INSTRUCTION_LEAD = "The instruction was to"
# Our own wording: the exemplars are requests (contexts carry no reference answers).
TEMPLATE = ("Each request below was written for an assistant, and all of them follow one shared "
            "instruction.\n\n{exemplars}\n\n" + INSTRUCTION_LEAD)
EXEMPLAR_CHARS = 300  # long contexts (code problems) would make every decoding input needlessly long


def sobol_candidates(num: int, dim: int, seed: int) -> np.ndarray:
    """``num`` scrambled Sobol points in [-1, 1]^dim (the bandit arms)."""
    sampler = qmc.Sobol(d=dim, scramble=True, seed=seed)
    m = int(np.ceil(np.log2(max(num, 1))))
    return sampler.random_base2(m)[:num] * 2.0 - 1.0


def exemplar_text(contexts: Sequence[str], k: int, seed: int) -> str:
    """``k`` contexts drawn reproducibly, each cut to EXEMPLAR_CHARS, formatted as numbered requests."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(contexts), size=min(k, len(contexts)), replace=False) if k else []
    parts = []
    for j, i in enumerate(picks, 1):
        text = contexts[int(i)].strip()
        text = text if len(text) <= EXEMPLAR_CHARS else text[:EXEMPLAR_CHARS].rstrip() + " ..."
        parts.append(f"Request {j}:\n{text}")
    return TEMPLATE.format(exemplars="\n\n".join(parts))


def clean_instruction(continuation: str) -> str:
    """The decoded sentence's continuation as a stand-alone instruction: first line, capitalised."""
    line = continuation.strip().split("\n")[0].strip()
    line = re.sub(r"^[:,\-\s]+", "", line)
    return line[:1].upper() + line[1:] if line else ""


@dataclass
class Decoded:
    instructions: list[str]  # cleaned, ready to put before a context
    continuations: list[str]  # raw text after "The instruction was to"
    features: np.ndarray  # (b, hidden) last-token hidden states of the decoding input


@dataclass(frozen=True)
class DecodeSpec:
    """Everything that fixes a candidate's instruction besides the model: the same spec and model give the
    same decode in any process, so batches can go to any generator actor (and be retried there)."""

    points: np.ndarray
    text: str
    soft_tokens: int
    seed: int
    max_new_tokens: int
    scale: float


def decode_batch(model: Any, tokenizer: Any, spec: DecodeSpec, ids: list[int]) -> Decoded:
    """Instructions and features of candidates ``ids`` on ``model`` (run inside a generator actor)."""
    return InstructionDecoder(model, tokenizer, spec.points, spec.text, spec.soft_tokens, spec.seed,
                              spec.max_new_tokens, spec.scale).decode(ids)


class InstructionDecoder:
    """Holds the white-box model and turns candidate ids into instructions (cheap to build: one projection)."""

    def __init__(self, model: Any, tokenizer: Any, points: np.ndarray, text: str, soft_tokens: int,
                 seed: int, max_new_tokens: int = 32, scale: float = 1.0) -> None:
        self.model, self.tokenizer, self.points = model, tokenizer, np.asarray(points, dtype=np.float64)
        self.max_new_tokens = max_new_tokens
        emb = model.get_input_embeddings().weight.detach()
        self.dtype, self.device = emb.dtype, emb.device
        hidden = emb.shape[1]
        self.target_norm = float(emb.float().norm(dim=1).mean()) * scale
        gen = torch.Generator().manual_seed(seed)
        dim = self.points.shape[1]
        # The fixed random projection A (soft_tokens*hidden x d) of InstructZero's low-dimensional search.
        self.proj = torch.randn(soft_tokens * hidden, dim, generator=gen, dtype=torch.float64) / dim**0.5
        self.soft_tokens, self.hidden = soft_tokens, hidden
        # The soft prompt goes just before the closing "The instruction was to": placed before a few
        # hundred tokens of exemplars it barely moved a 135M model's greedy decode (every candidate gave
        # the same instruction, even at 10x the embedding norm); next to the lead it steers it.
        head, lead = (text[: -len(INSTRUCTION_LEAD)], INSTRUCTION_LEAD) if text.endswith(INSTRUCTION_LEAD) \
            else (text, "")
        with torch.no_grad():
            self.head_embeds, self.lead_embeds = (
                model.get_input_embeddings()(tokenizer(part, return_tensors="pt", add_special_tokens=False)
                                             ["input_ids"].to(self.device))[0] for part in (head, lead))

    def soft_prompts(self, ids: Sequence[int]) -> torch.Tensor:
        """(b, soft_tokens, hidden) embeddings of the candidates ``ids``, each token at the mean norm."""
        z = torch.as_tensor(self.points[list(ids)], dtype=torch.float64)
        soft = (z @ self.proj.T).reshape(len(ids), self.soft_tokens, self.hidden)
        soft = soft / soft.norm(dim=-1, keepdim=True).clamp_min(1e-12) * self.target_norm
        return soft.to(self.device, self.dtype)

    @torch.inference_mode()
    def decode(self, ids: Sequence[int]) -> Decoded:
        """Greedy instructions and features of candidates ``ids`` in one batched ``generate``."""
        soft = self.soft_prompts(ids)
        b = len(ids)
        embeds = torch.cat([self.head_embeds.expand(b, -1, -1), soft, self.lead_embeds.expand(b, -1, -1)], dim=1)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=self.device)
        out = self.model.generate(
            inputs_embeds=embeds, attention_mask=mask, max_new_tokens=self.max_new_tokens, do_sample=False,
            temperature=None, top_p=None, top_k=None, pad_token_id=self.tokenizer.pad_token_id,
            output_hidden_states=True, return_dict_in_generate=True)
        # hidden_states[0] is the prefill step: per layer (b, L, hidden); the last layer's last position.
        feats = out.hidden_states[0][-1][:, -1, :].float().cpu().numpy()
        # With inputs_embeds and no input_ids, generate returns only the new tokens.
        conts = self.tokenizer.batch_decode(out.sequences, skip_special_tokens=True)
        return Decoded([clean_instruction(c) for c in conts], conts, feats)


CANDIDATES_JSON = "reveal/candidates/instructions.json"
CANDIDATES_NPY = "reveal/candidates/features.npy"


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _npy_load(data: bytes) -> np.ndarray:
    import io

    return np.load(io.BytesIO(data), allow_pickle=False)


def prepare_candidates(cfg: Any, run: Any, contexts: Sequence[str], pool: Any,
                       on_batch: Any = None) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Decode every candidate's instruction and features once, in batches, cached in the run directory.

    The batches run in the generator pool's actors (``GeneratorPool.with_model``), on the devices and nodes
    Ray gave them, never in the driver; reveal decodes every candidate before it scores any, so the actors
    are otherwise idle then. Each finished batch, once all before it are in, is written before more are, so
    a killed run resumes from the last written batch.
    """
    rc, seed = cfg.reveal, cfg.run.seed
    rows: list[dict[str, Any]] = []
    feats = np.zeros((0, 0), dtype=np.float32)
    if run.exists(CANDIDATES_JSON):
        rows = run.read_json(CANDIDATES_JSON)["candidates"]
        feats = _npy_load(run.read_bytes(CANDIDATES_NPY))[: len(rows)]
    if on_batch:
        on_batch(len(rows))
    if len(rows) >= rc.num_candidates:
        return rows[: rc.num_candidates], feats[: rc.num_candidates]
    text = exemplar_text(contexts, rc.exemplars, seed)
    spec = DecodeSpec(sobol_candidates(rc.num_candidates, rc.intrinsic_dim, seed), text, rc.soft_tokens,
                      seed + 1, rc.max_instruction_tokens, rc.soft_prompt_scale)
    batches = [list(range(s, min(s + rc.decode_batch_size, rc.num_candidates)))
               for s in range(len(rows), rc.num_candidates, rc.decode_batch_size)]
    done: dict[int, Decoded] = {}
    state = {"next": 0, "feats": feats}

    def collect(i: int, out: Decoded) -> None:
        done[i] = out
        while state["next"] in done:  # write the finished prefix, in candidate order
            ids, dec = batches[state["next"]], done.pop(state["next"])
            rows.extend({"id": c, "instruction": ins, "continuation": cont}
                        for c, ins, cont in zip(ids, dec.instructions, dec.continuations))
            new = dec.features.astype(np.float32)
            state["feats"] = np.concatenate([state["feats"], new]) if state["feats"].size else new
            state["next"] += 1
            run.write_bytes(CANDIDATES_NPY, _npy_bytes(state["feats"]))  # features first: the JSON commits both
            run.write_json(CANDIDATES_JSON, {"decoding_input": text, "candidates": rows})
        if on_batch:
            on_batch(len(out.instructions))

    try:
        pool.with_model(decode_batch, [(spec, ids) for ids in batches], collect)
    finally:
        pool.drop_model_copies()
    return rows, state["feats"]
