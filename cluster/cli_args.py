"""What every `onspec` command shares: its error, the config built from flags (the one typed OnspecConfig, over
``--config`` YAML), and the flags themselves. ``cluster/cli.py`` and ``cluster/bench/commands.py`` build on it."""
from __future__ import annotations

import os
from pathlib import Path

from onspec.actors.config import OnspecConfig


class CLIError(Exception):
    pass


def config_from_args(args) -> OnspecConfig:
    cfg = OnspecConfig.from_yaml(args.config) if getattr(args, "config", None) else OnspecConfig()
    return cfg.merged(**{
        "data_dir": getattr(args, "data_dir", None),
        "drafter.checkpoint": getattr(args, "drafter_checkpoint", None),
        "speculation.source": (getattr(args, "drafter", None) or [None])[-1],
        "drafter.kind": getattr(args, "drafter_kind", None),
        "drafter.layers": getattr(args, "layers", None),
        "drafter.vocab_keep": getattr(args, "vocab_keep", None),
        "speculation.mode": getattr(args, "mode", None),
        "speculation.max_draft": getattr(args, "max_draft", None),
        "speculation.fixed_k": getattr(args, "fixed_k", None),
    })


def engine_from_config(cfg: OnspecConfig):
    from onspec.actors.engine import SpeculativeEngine
    return SpeculativeEngine.from_config(cfg)


def serve_config(args) -> OnspecConfig:
    cfg = config_from_args(args)
    # The one place the environment is read: REDIS_URL, as a default for --redis-url.
    redis_url = args.redis_url or os.environ.get("REDIS_URL") or None
    return cfg.merged(**{
        "server.host": args.host, "server.port": args.port, "server.replicas": args.replicas,
        "server.ray_address": args.ray_address, "redis.url": redis_url,
        "server.api_key_file": getattr(args, "api_key_file", None),
        "server.admin_key_file": getattr(args, "admin_key_file", None),
        "stream.enabled": False if args.no_stream else None,
        "trainer.enabled": False if getattr(args, "no_train", False) else None,
        "model.chat_template": getattr(args, "chat_template", None),
        "server.tool_call_parser": getattr(args, "tool_call_parser", None),
    })


def common_flags(sp) -> None:
    """The flags every command that loads the model takes."""
    sp.add_argument("--config", type=Path, help="YAML config file (the OnspecConfig fields)")
    sp.add_argument("--data-dir", type=Path, help="converted models, corpora, checkpoints")
    sp.add_argument("--drafter-checkpoint", type=Path, help="drafter checkpoint directory (default: derived)")
    sp.add_argument("--drafter-kind", choices=["truncated", "feature"],
                    help="the derived drafter: the target's first layers (truncated) or one layer over the "
                         "target's hidden state (feature, EAGLE; the default)")
    sp.add_argument("--drafter", action="append", choices=["model", "suffix", "hybrid"],
                    help="draft source: the drafter model, text seen before (SuffixDecoding), or per round "
                         "whichever pays (default hybrid); bench decode runs each one given side by side")
    sp.add_argument("--mode", choices=["adaedl", "fixed"], help="draft-length control")
    sp.add_argument("--max-draft", type=int, help="longest draft per round (adaedl)")
    sp.add_argument("--fixed-k", type=int, help="draft length in fixed mode")


def server_flags(sp) -> None:
    """The flags of commands that start (or join) a cluster."""
    sp.add_argument("--host", help="bind address (default 127.0.0.1)")
    sp.add_argument("--port", type=int, help="HTTP port (default 8000)")
    sp.add_argument("--replicas", type=int, help="engine replicas (default 1)")
    sp.add_argument("--ray-address", help="join this Ray cluster instead of starting a local one")
    sp.add_argument("--redis-url", help="Redis for the rejection stream (default: $REDIS_URL, else a "
                                        "private redis-server in the data dir)")
    sp.add_argument("--no-stream", action="store_true", help="do not log rejections")
    sp.add_argument("--chat-template", help="a Jinja chat template file, or a shipped one by name (hermes_tools: "
                                            "renders tools), instead of the model's own")
    sp.add_argument("--tool-call-parser", choices=["hermes"], help="read tool calls from the model's text, for "
                                                                   "tool_choice auto (needs a template that "
                                                                   "renders tools)")
