"""transformers backend: batched, left-padded decoding with optional per-request LoRA adapters."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from rr_ray.generation.base import Completion, Request, SamplingParams, cut_at_stop
from rr_ray.models.loader import apply_chat, load_model, load_tokenizer, model_device

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch


class HFGenerator:
    """Generates with ``model.generate``; rows of one batch may use different adapters (peft mixed batch)."""

    def __init__(self, model_dir: str | Path, dtype: str = "float32", threads: int | None = None,
                 batch_size: int = 32, device: str | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        # None: the GPU Ray assigned to this worker (sweep trial, generation actor, evaluate task, serve
        # replica), else the CPU; outside Ray, CUDA when present. Inputs follow the model to this device.
        self.device = device or model_device()
        self.tokenizer = load_tokenizer(model_dir)
        self.model = load_model(model_dir, dtype, device=self.device)
        self.batch_size = batch_size
        self._adapters: dict[str, str] = {}  # adapter dir -> adapter name in the PeftModel

    def _adapter_name(self, path: str | None) -> str:
        if path is None:
            return BASE_ADAPTER
        if path not in self._adapters:
            from peft import PeftModel

            name = "a" + hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:12]
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(path, adapter_name=name, torch_device=self.device)
            else:  # torch_device: else peft loads onto its own guess, "cuda", which Ray may not have assigned
                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name,
                                                       torch_device=self.device)
            self.model.eval()
            self._adapters[path] = name
        return self._adapters[path]

    def render(self, request: Request) -> str:
        return apply_chat(self.tokenizer, request.prompt) if request.chat else request.prompt

    @torch.inference_mode()
    def _generate_batch(self, texts: list[str], adapters: list[str], params: SamplingParams,
                        streamer: Any = None) -> list[Completion]:
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        kwargs: dict = dict(
            max_new_tokens=params.max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            do_sample=params.temperature > 0,
        )
        if params.temperature > 0:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        else:  # neutralise sampling defaults from generation_config.json so greedy stays greedy
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        if params.ignore_eos:
            kwargs["min_new_tokens"] = params.max_new_tokens
        if self._adapters:  # once a PeftModel, "no adapter" must be explicit or the active one applies
            kwargs["adapter_names"] = adapters
        if streamer is not None:
            kwargs["streamer"] = streamer
        out = self.model.generate(**enc, **kwargs)
        new = out[:, enc["input_ids"].shape[1]:]
        eos = self.tokenizer.eos_token_id
        results = []
        for row in new.tolist():
            ended = False
            if not params.ignore_eos and eos in row:
                row, ended = row[: row.index(eos)], True
            while row and row[-1] == self.tokenizer.pad_token_id and not params.ignore_eos:
                row.pop()
            text, stopped = cut_at_stop(self.tokenizer.decode(row, skip_special_tokens=True), params.stop)
            reason = "stop" if ended or stopped or len(row) < params.max_new_tokens else "length"
            results.append(Completion(text=text, num_tokens=len(row), finish_reason=reason,
                                      meta={"token_ids": row}))
        return results

    @torch.inference_mode()
    def loglik(self, requests: list[Request], continuations: list[str]) -> list[tuple[float, int]]:
        """Teacher-forced (summed NLL, token count) of each continuation after its rendered prompt.

        Prompt and continuation are tokenized separately and concatenated, so the scored tokens are exactly
        the continuation's. An empty prompt scores the continuation from its second token on. Rows are
        right-padded; a row's adapter is applied through peft's mixed-batch ``adapter_names``.
        """
        if len(requests) != len(continuations):
            raise ValueError(f"{len(requests)} requests but {len(continuations)} continuations")
        rows = []
        for req, cont in zip(requests, continuations):
            ctx = self.tokenizer(self.render(req), add_special_tokens=False)["input_ids"]
            tgt = self.tokenizer(cont, add_special_tokens=False)["input_ids"]
            rows.append((ctx + tgt, max(len(ctx), 1), self._adapter_name(req.adapter)))
        order = sorted(range(len(rows)), key=lambda k: len(rows[k][0]))
        out: dict[int, tuple[float, int]] = {}
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            width = max(len(rows[k][0]) for k in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for b, k in enumerate(chunk):
                ids[b, : len(rows[k][0])] = torch.tensor(rows[k][0])
                mask[b, : len(rows[k][0])] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)  # built on the host, one copy per batch
            kwargs = {}
            if self._adapters:
                kwargs["adapter_names"] = [rows[k][2] for k in chunk]
            # Only positions that predict a continuation token get logits (vocab-sized rows dominate memory).
            start_pos = min(rows[k][1] for k in chunk) - 1
            logits = self.model(input_ids=ids, attention_mask=mask, logits_to_keep=width - start_pos,
                                **kwargs).logits
            for b, k in enumerate(chunk):
                seq, first = rows[k][0], rows[k][1]
                row = logits[b, first - 1 - start_pos : len(seq) - 1 - start_pos].float()
                nll = torch.nn.functional.cross_entropy(row, ids[b, first : len(seq)], reduction="sum").item()
                out[k] = (nll, max(len(seq) - first, 0))
        return [out[k] for k in range(len(rows))]

    def generate_batch(self, requests: list[Request], params: SamplingParams,
                       streamer: Any = None) -> list[Completion]:
        """One ``model.generate`` call over ``requests`` in the given order: no ``n`` expansion, no reseeding.

        ``streamer`` (a transformers ``BaseStreamer``) receives the prompt ids, then each step's new token per row.
        """
        return self._generate_batch([self.render(r) for r in requests],
                                    [self._adapter_name(r.adapter) for r in requests], params, streamer)

    def generate(self, requests: list[Request], params: SamplingParams) -> list[list[Completion]]:
        """n completions per request, in request order. Prompts are length-sorted to limit padding."""
        rows: list[tuple[int, str, str]] = []
        for i, req in enumerate(requests):
            text, adapter = self.render(req), self._adapter_name(req.adapter)
            rows.extend((i, text, adapter) for _ in range(params.n))
        order = sorted(range(len(rows)), key=lambda k: len(rows[k][1]))
        done: dict[int, Completion] = {}
        if params.temperature > 0:
            torch.manual_seed(params.seed)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            outs = self._generate_batch([rows[k][1] for k in chunk], [rows[k][2] for k in chunk], params)
            done.update(zip(chunk, outs))
        grouped: list[list[Completion]] = [[] for _ in requests]
        for k in range(len(rows)):
            grouped[rows[k][0]].append(done[k])
        return grouped
