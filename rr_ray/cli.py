"""``rr-ray``: the command line. Config errors print one line and exit 2, before anything is written."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

from rr_ray.config import ConfigError, RRConfig, load_config
from rr_ray.models.packaged import ModelNotFoundError
from rr_ray.storage import StorageError

EXIT_USAGE = 2


def _config_args(parser: argparse.ArgumentParser, dest: str) -> None:
    parser.add_argument("--set", dest=dest, action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value by its dotted key, e.g. --set release.lora.r=16")


def _cmd_run(cfg: RRConfig, args: argparse.Namespace) -> int:
    from rr_ray.pipeline import console, run_pipeline

    summary = run_pipeline(cfg)
    g = summary["generate"]
    console.print(f"generated {g['rows']} completions for {g['prompts']} prompts: {g['new_tokens']} new tokens "
                  f"in {g['wall_s']:.1f} s = {g['tokens_per_s']:.1f} tokens/s "
                  f"({g['actors']} {g['backend']} actor(s), ray: {g['ray']})")
    console.print(f"run directory: [bold]{summary['run_dir']}[/bold] (total {summary['wall_s']:.1f} s)")
    print(json.dumps(summary))
    return 0


def _cmd_config(cfg: RRConfig, args: argparse.Namespace) -> int:
    print(cfg.to_yaml(), end="")
    return 0


def _cmd_evaluate(cfg: RRConfig, args: argparse.Namespace) -> int:
    from rr_ray.evaluation.evaluate import evaluate, metrics_table, write_result
    from rr_ray.pipeline import console

    result = evaluate(cfg, adapter=args.adapter, limit=args.limit)
    console.print(metrics_table(result))
    console.print(f"written to [bold]{write_result(cfg, result)}[/bold] "
                  f"(forget {result['wall_s']['forget']} s, utility {result['wall_s']['utility']} s)")
    print(json.dumps(result))
    return 0


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", choices=["code", "toxicity", "ner", "custom"], help="= --set task.name=T")
    p.add_argument("--model", help="= --set model.name_or_path=M")
    p.add_argument("--adapter", help="PEFT LoRA dir (a composed edit log) applied to the model; none = base")
    p.add_argument("--limit", type=int, help="at most N evaluation items per score (default: all)")


COMMANDS: dict[str, tuple[str, Callable[[RRConfig, argparse.Namespace], int]]] = {
    "run": ("run every pipeline stage that exists into the run directory (resumable)", _cmd_run),
    "config": ("print the resolved config (YAML + overrides + defaults) and exit", _cmd_config),
    "evaluate": ("score a model (+ adapter) on a task's forget and utility metrics -> eval/<task>.json",
                 _cmd_evaluate),
}
EXTRA_ARGS: dict[str, Callable[[argparse.ArgumentParser], None]] = {"evaluate": _evaluate_args}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rr-ray", description="Reveal-and-Release LLM unlearning with self-generated data, on Ray.")
    _config_args(parser, "set_global")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("config", nargs="?", default=None,
                       help="YAML config (default: built-in defaults = configs/default.yaml)")
        _config_args(p, "set_local")
        if name in EXTRA_ARGS:
            EXTRA_ARGS[name](p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides: list[str] = [*args.set_global, *getattr(args, "set_local", [])]
    if getattr(args, "task", None):
        overrides.append(f"task.name={args.task}")
    if getattr(args, "model", None):
        overrides.append(f"model.name_or_path={args.model}")
    try:
        cfg = load_config(args.config, overrides)
        return COMMANDS[args.command][1](cfg, args)
    except ConfigError as exc:
        print(f"rr-ray: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (FileNotFoundError, NotImplementedError, ModelNotFoundError, StorageError) as exc:
        print(f"rr-ray: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def entry() -> Any:
    sys.exit(main())
