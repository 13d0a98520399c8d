"""Process entry: ``python -m executor_svc``."""

from __future__ import annotations

import asyncio

from executor_svc.server import build_server
from executor_svc.settings import ExecutorSettings
from loraserve.logging import configure_logging
from loraserve.server import run_until_signal


def main() -> None:
    settings = ExecutorSettings()
    configure_logging(settings.common.log_level, settings.common.log_json)
    asyncio.run(run_until_signal([build_server(settings)]))


if __name__ == "__main__":
    main()
