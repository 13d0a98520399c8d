"""loraserve: serve one base LLM with a large, changing pool of LoRA adapters chosen per prompt."""

from loraserve.client import AsyncClient, Client
from loraserve.errors import LoraserveError
from loraserve.requests import GenerateResult, StreamChunk

__all__ = ["AsyncClient", "Client", "GenerateResult", "LoraserveError", "StreamChunk"]
__version__ = "0.1.0"
