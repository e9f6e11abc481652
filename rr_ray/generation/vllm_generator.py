"""vLLM backend (GPU). Imported only when ``generation.backend: vllm``; needs the ``gpu`` extra."""

from __future__ import annotations

import zlib
from pathlib import Path

from rr_ray.generation.base import Completion, Request, SamplingParams, cut_at_stop
from rr_ray.models.loader import apply_chat


class VLLMGenerator:
    """Same contract as HFGenerator, served by a vLLM engine; adapters become ``LoRARequest``s."""

    def __init__(self, model_dir: str | Path, dtype: str = "bfloat16", max_lora_rank: int = 64,
                 gpu_memory_utilization: float = 0.85, seed: int = 0, **_: object) -> None:
        try:
            from vllm import LLM
        except ImportError as exc:
            raise RuntimeError("generation.backend=vllm needs the gpu extra: pip install 'rr-ray[gpu]'") from exc
        self.llm = LLM(model=str(model_dir), dtype="bfloat16" if dtype == "auto" else dtype, enable_lora=True, max_lora_rank=max_lora_rank,
                       max_loras=4, gpu_memory_utilization=gpu_memory_utilization, seed=seed)
        self.tokenizer = self.llm.get_tokenizer()

    @staticmethod
    def _lora(path: str | None):  # noqa: ANN205 - vllm type, imported lazily
        if path is None:
            return None
        from vllm.lora.request import LoRARequest

        resolved = str(Path(path).resolve())
        # vLLM keys adapters by a positive int id: derive a stable one from the path.
        return LoRARequest(Path(resolved).name, zlib.crc32(resolved.encode()) % (2**31 - 1) + 1, resolved)

    def generate(self, requests: list[Request], params: SamplingParams) -> list[list[Completion]]:
        from vllm import SamplingParams as VLLMSamplingParams

        sampling = VLLMSamplingParams(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_new_tokens,
            stop=list(params.stop) or None,
            seed=params.seed if params.temperature > 0 else None,
            ignore_eos=params.ignore_eos,
        )
        prompts = [apply_chat(self.tokenizer, r.prompt) if r.chat else r.prompt for r in requests]
        loras = [self._lora(r.adapter) for r in requests]
        outputs = self.llm.generate(prompts, sampling, lora_request=loras, use_tqdm=False)
        results = []
        for out in outputs:
            group = []
            for o in out.outputs:
                text, _ = cut_at_stop(o.text, params.stop)  # vLLM already stops; keep the contract exact
                group.append(Completion(text=text, num_tokens=len(o.token_ids),
                                        finish_reason="length" if o.finish_reason == "length" else "stop"))
            results.append(group)
        return results
