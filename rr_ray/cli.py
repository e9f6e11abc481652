"""``rr-ray``: the command line. Config errors print one line and exit 2, before anything is written."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

from rr_ray.config import ConfigError, RRConfig, config_from_text, load_config
from rr_ray.evaluation.sandbox import SandboxUnavailableError, set_allow_unisolated
from rr_ray.models.packaged import ModelNotFoundError
from rr_ray.storage import RunDir, StorageError

EXIT_USAGE = 2


def _config_args(parser: argparse.ArgumentParser, dest: str) -> None:
    parser.add_argument("--set", dest=dest, action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value by its dotted key, e.g. --set release.lora.r=16")


def _cmd_run(cfg: RRConfig, args: argparse.Namespace) -> int:
    from rr_ray.pipeline import console, run_pipeline

    summary = run_pipeline(cfg)
    times = ", ".join(f"{k} {v:.0f} s" for k, v in summary["stages_s"].items())
    console.print(f"run directory: [bold]{summary['run_dir']}[/bold] (total {summary['wall_s']:.1f} s: {times})")
    print(json.dumps(summary, default=str))
    return 0


def _cmd_compare(cfg: RRConfig, args: argparse.Namespace) -> int:
    from rr_ray.compare import run_compare
    from rr_ray.pipeline import console

    summary = run_compare(cfg)
    console.print(f"compare: table in [bold]{summary['table']}[/bold] ({summary['wall_s']:.1f} s)")
    print(json.dumps(summary, default=str))
    return 0


def _cmd_config(cfg: RRConfig, args: argparse.Namespace) -> int:
    print(cfg.to_yaml(), end="")
    return 0


def _cmd_evaluate(cfg: RRConfig, args: argparse.Namespace) -> int:
    from rr_ray.evaluation.evaluate import evaluate, metrics_table, write_result
    from rr_ray.pipeline import console

    if args.edit_log and args.adapter:
        raise ConfigError("evaluate: give --adapter or --edit-log, not both")
    if args.edit_log:
        result = _evaluate_edit_log(cfg, args.edit_log, args.limit)
    else:
        result = evaluate(cfg, adapter=args.adapter, limit=args.limit)
    console.print(metrics_table(result))
    console.print(f"written to [bold]{write_result(cfg, result)}[/bold] "
                  f"({result['wall_s']} s)")
    print(json.dumps(result))
    return 0


def _evaluate_edit_log(cfg: RRConfig, path: str, limit: int | None) -> dict[str, Any]:
    """Evaluate base + an edit log (its relative adapter paths are read against the log's folder)."""
    import tempfile
    from pathlib import Path

    from rr_ray.evaluation.evaluate import evaluate
    from rr_ray.release.pem import EditLog, compose

    log_path = Path(path)
    if not log_path.is_file():
        raise FileNotFoundError(f"--edit-log {path}: no such file")
    try:
        log = EditLog.load(log_path)
    except ValueError as exc:
        raise ConfigError(f"--edit-log {path}: {exc}") from None
    with tempfile.TemporaryDirectory(prefix="rr-ray-eval-") as tmp:
        adapter = compose(log, Path(tmp) / "composed", root=log_path.parent)
        result = evaluate(cfg, adapter=str(adapter) if adapter else None, limit=limit)
    return result | {"adapter": None, "edit_log": str(log_path), "edits": len(log.edits)}


def _cmd_release(cfg: RRConfig, args: argparse.Namespace) -> int:
    from rr_ray.pipeline import console, open_run, stage_release

    summary = stage_release(cfg, open_run(cfg))
    console.print(f"release: s {summary['s_base']:.4g} -> {summary['s_final']:.4g} "
                  f"(forget score down {100 * summary['forget_drop']:.1f} %), u {summary['u_base']:.4g} -> "
                  f"{summary['u_final']:.4g} ({100 * summary['utility_kept']:.1f} % of base kept)")
    print(json.dumps(summary))
    return 0


def _cmd_serve(cfg: RRConfig, args: argparse.Namespace) -> int:
    from rr_ray.serving.app import ServeArgs, serve_run
    from rr_ray.serving.llm_app import lora_store_for

    backend = args.backend or cfg.generation.backend
    # checked before Ray starts; the app builder applies the same rule
    if backend == "vllm" and lora_store_for(ServeArgs(run=args.run, lora_store=args.lora_store)) is None:
        raise ConfigError("serve --backend vllm (ray.serve.llm) loads the unlearned LoRA only from object storage: "
                          "give --lora-store s3://bucket/prefix, or serve a run on s3://, or use --backend hf")
    # cfg is the run's run.yaml (--model already applied to it): serve that base model under the run's adapter.
    serve_run(args.run, host=args.host, port=args.port, ray_cfg=cfg.ray, model=cfg.model.name_or_path,
              adapter=args.adapter, served_name=args.name, backend=backend, lora_store=args.lora_store,
              dtype=cfg.generation.dtype, cache_dir=cfg.model.cache_dir, s3_endpoint_url=cfg.run.s3_endpoint_url)
    return 0


def _cmd_export(cfg: RRConfig, args: argparse.Namespace) -> int:
    from rr_ray.export import export_run
    from rr_ray.pipeline import console

    run = RunDir.open(args.run, endpoint_url=cfg.run.s3_endpoint_url)
    info = export_run(run, cfg)
    console.print(f"export: {info['files']} files, {info['bytes'] / 1e6:.1f} MB in [bold]{info['export']}[/bold]"
                  f" ({info['seconds']} s when built)")
    console.print(f"  merged/        {info['dtype']} model with every edit merged in (AutoModelForCausalLM)")
    if info["composed_lora"]:
        console.print(f"  composed_lora/ one PEFT LoRA of rank {info['composed_rank']} = the whole edit log")
    console.print(f"  adapters/      {', '.join(a.split('/')[-1] for a in info['adapters']) or 'none'} "
                  "(+ edit_log.json, README.md)")
    print(json.dumps(info))
    return 0


def _cmd_report(cfg: RRConfig, args: argparse.Namespace) -> int:
    from rr_ray.pipeline import console
    from rr_ray.report import write_report

    uri = write_report(RunDir.open(args.run, endpoint_url=cfg.run.s3_endpoint_url), cfg)
    console.print(f"report written to [bold]{uri}[/bold]")
    print(json.dumps({"report": uri}))
    return 0


def _cmd_audit(cfg: RRConfig, args: argparse.Namespace) -> int:
    from rr_ray.audit.run import run_audit
    from rr_ray.pipeline import console

    summary = run_audit(cfg, RunDir.open(args.run, endpoint_url=cfg.run.s3_endpoint_url), console)
    console.print(f"audit: report in [bold]{summary['report']}[/bold] ({summary['wall_s']:.1f} s)")
    print(json.dumps(summary, default=str))
    return 0


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="base model (default: the one in the run's run.yaml)")
    p.add_argument("--adapter", help="serve this composed LoRA dir instead of the run's")
    p.add_argument("--name", default="rr-ray", help="hf: model name of the unlearned model (base: NAME-base); "
                                                    "vllm: NAME-base and NAME-base:unlearned")
    p.add_argument("--backend", choices=["hf", "vllm"],
                   help="hf: rr-ray's server over transformers; vllm: a ray.serve.llm app (default: the run's "
                        "generation.backend)")
    p.add_argument("--lora-store", help="vllm: s3:// prefix the unlearned LoRA is published to (default "
                                        "RUN/serve/loras for a run on s3://)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (default loopback only)")
    p.add_argument("--port", type=int, default=8000)


def _cmd_reveal(cfg: RRConfig, args: argparse.Namespace) -> int:
    from rr_ray.reveal.cli import reveal_command

    return reveal_command(cfg, compare_plain=args.compare_plain)


def _reveal_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compare-plain", action="store_true",
                   help="also answer as many plain task prompts and print relevance/Vendi side by side")


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", help="= --set task.name=T (code, toxicity, ner, custom or package.module:Class)")
    p.add_argument("--model", help="= --set model.name_or_path=M")
    p.add_argument("--adapter", help="PEFT LoRA dir (a composed edit log) applied to the model; none = base")
    p.add_argument("--edit-log", help="edit_log.json (a run's, or export/edit_log.json) composed onto the model")
    p.add_argument("--limit", type=int, help="at most N evaluation items per score (default: all)")


COMMANDS: dict[str, tuple[str, Callable[[RRConfig, argparse.Namespace], int]]] = {
    "run": ("reveal -> release -> evaluate -> export -> report into the run directory (resumable)", _cmd_run),
    "compare": ("run compare.methods (ours, baselines) side by side on the same test halves -> compare/",
                _cmd_compare),
    "config": ("print the resolved config (YAML + overrides + defaults) and exit", _cmd_config),
    "evaluate": ("score a model (+ adapter) on a task's forget and utility metrics -> eval/<task>.json",
                 _cmd_evaluate),
    "serve": ("serve a run's unlearned model (+ its base) over an OpenAI-compatible HTTP API (Ray Serve)",
              _cmd_serve),
    "release": ("compose forget/retain PEMs with swept weights (eq. 1) -> release/, edit_log.json", _cmd_release),
    "export": ("write a run's merged HF model, PEFT adapters and composed LoRA -> export/", _cmd_export),
    "report": ("write a run's markdown report (tables, best instructions, timings, plots) -> report/",
               _cmd_report),
    "reveal": ("generate the forget data (paper Alg. 1) -> reveal/forget.jsonl (resumable)", _cmd_reveal),
    "audit": ("attack a run's unlearned model (+ base, compared methods): relearning, quantization, prompt probes, "
              "edit location -> audit/, report/audit.md", _cmd_audit),
}
EXTRA_ARGS: dict[str, Callable[[argparse.ArgumentParser], None]] = {"evaluate": _evaluate_args,
                                                                     "serve": _serve_args,
                                                                     "reveal": _reveal_args}


# Commands on a finished (or running) run: their positional is the run directory, their config its run.yaml.
RUN_COMMANDS = ("export", "report", "serve", "audit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rr-ray", description="Reveal-and-Release LLM unlearning with self-generated data, on Ray.")
    _config_args(parser, "set_global")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name in RUN_COMMANDS:
            p.add_argument("run", help="run directory: a local path or s3://bucket/prefix")
            p.add_argument("--s3-endpoint-url", help="S3 endpoint of an s3:// run (MinIO, moto, ...)")
        else:
            p.add_argument("config", nargs="?", default=None,
                           help="YAML config (default: built-in defaults = configs/default.yaml)")
        _config_args(p, "set_local")
        if name in EXTRA_ARGS:
            EXTRA_ARGS[name](p)
    return parser


def run_config(run_uri: str, endpoint_url: str | None, overrides: list[str]) -> RRConfig:
    """The config a run was made with (its run.yaml), with ``--set`` overrides applied."""
    run = RunDir.open(run_uri, endpoint_url=endpoint_url)
    if not run.exists("run.yaml"):
        raise ConfigError(f"{run.uri}: not a run directory (no run.yaml)")
    endpoint = [f"run.s3_endpoint_url={endpoint_url}"] if endpoint_url else []
    return config_from_text(run.read_text("run.yaml"), f"{run.uri}/run.yaml", [*overrides, *endpoint])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides: list[str] = [*args.set_global, *getattr(args, "set_local", [])]
    if getattr(args, "task", None):
        overrides.append(f"task.name={args.task}")
    if getattr(args, "model", None):
        overrides.append(f"model.name_or_path={args.model}")
    try:
        if args.command in RUN_COMMANDS:
            cfg = run_config(args.run, args.s3_endpoint_url, overrides)
        else:
            cfg = load_config(args.config, overrides)
        # Before any Ray worker starts: cluster.connect forwards the setting to every worker.
        set_allow_unisolated(cfg.sandbox.allow_unisolated)
        return COMMANDS[args.command][1](cfg, args)
    except ConfigError as exc:
        print(f"rr-ray: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (FileNotFoundError, NotImplementedError, ModelNotFoundError, StorageError) as exc:
        print(f"rr-ray: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SandboxUnavailableError as exc:
        # From a Ray worker it arrives wrapped with the worker's traceback; its cause is the one line.
        print(f"rr-ray: error: {getattr(exc, 'cause', None) or exc}", file=sys.stderr)
        return EXIT_USAGE


def entry() -> Any:
    sys.exit(main())
