"""Process entry: ``python -m retriever_svc``."""

from __future__ import annotations

import asyncio

from loraserve.logging import configure_logging
from loraserve.server import run_until_signal
from retriever_svc.server import build_server
from retriever_svc.settings import RetrieverSettings


def main() -> None:
    settings = RetrieverSettings()
    configure_logging(settings.common.log_level, settings.common.log_json)
    asyncio.run(run_until_signal([build_server(settings)]))


if __name__ == "__main__":
    main()
