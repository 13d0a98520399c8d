"""Process entry: ``python -m executor_svc [--model-dir DIR] [--adapter-dir DIR] [--port N]``.

Settings come from ``LORASERVE_EXECUTOR_*`` / ``LORASERVE_*``; the flags override the few a
person starting one executor by hand most often wants to change.
"""

from __future__ import annotations

import argparse
import asyncio

from executor_svc.server import build_server
from executor_svc.settings import ExecutorSettings
from loraserve.logging import configure_logging
from loraserve.server import run_until_signal


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m executor_svc")
    parser.add_argument("--model-dir", help="transformers checkpoint (default: tiny random Llama)")
    parser.add_argument("--adapter-dir", help="local PEFT adapters: <dir>/<id>[/<version>]")
    parser.add_argument("--no-registry", action="store_true", help="serve local adapters only")
    parser.add_argument("--port", type=int)
    parser.add_argument("--device", help='"auto", "cuda", "cpu"')
    args = parser.parse_args(argv)
    overrides = {
        "model_dir": args.model_dir,
        "adapter_dir": args.adapter_dir,
        "port": args.port,
        "device": args.device,
        "use_registry": False if args.no_registry else None,
    }
    settings = ExecutorSettings(**{k: v for k, v in overrides.items() if v is not None})
    configure_logging(settings.common.log_level, settings.common.log_json)
    asyncio.run(run_until_signal([build_server(settings)]))


if __name__ == "__main__":
    main()
