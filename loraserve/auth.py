"""Bearer-token authorisation with three levels: read < write < admin.

Each RPC has a required level (``METHOD_LEVELS``; unlisted RPCs need ``read``). A token grants
its own level and those below it. Health checks and reflection never need a token. With no
token configured at all, auth is off (the one-machine default).
"""

from __future__ import annotations

import hmac
from enum import IntEnum

from loraserve.errors import PermissionDenied, Unauthenticated


class Level(IntEnum):
    READ = 1
    WRITE = 2
    ADMIN = 3


_API = "/loraserve.api.v1."
METHOD_LEVELS: dict[str, Level] = {
    _API + "RegistryService/PushAdapter": Level.WRITE,
    _API + "RegistryService/DeleteAdapter": Level.WRITE,
    _API + "RegistryService/RegisterBaseModel": Level.ADMIN,
    _API + "JobService/StartIngest": Level.WRITE,
    _API + "JobService/TrainRetriever": Level.ADMIN,
    _API + "JobService/TrainGate": Level.ADMIN,
    _API + "ExecutorService/LoadAdapter": Level.ADMIN,
    _API + "ExecutorService/UnloadAdapter": Level.ADMIN,
}
OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


class TokenAuth:
    def __init__(self, read: str = "", write: str = "", admin: str = ""):
        self._tokens = [
            (t, lvl)
            for t, lvl in ((admin, Level.ADMIN), (write, Level.WRITE), (read, Level.READ))
            if t
        ]

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def level_of(self, token: str) -> Level | None:
        for known, level in self._tokens:
            if hmac.compare_digest(known.encode(), token.encode()):
                return level
        return None

    def check(self, method: str, metadata: dict[str, str]) -> None:
        """Raise Unauthenticated / PermissionDenied unless the call may proceed."""
        if not self.enabled or method.startswith(OPEN_PREFIXES):
            return
        header = metadata.get("authorization", "")
        if not header.lower().startswith("bearer "):
            raise Unauthenticated("missing bearer token (metadata 'authorization: Bearer <token>')")
        level = self.level_of(header[7:].strip())
        if level is None:
            raise Unauthenticated("unknown token")
        needed = METHOD_LEVELS.get(method, Level.READ)
        if level < needed:
            raise PermissionDenied(f"{method} needs a {needed.name.lower()} token")
