"""The base of ``State``: a Redis client and imagebatch's Lua scripts (``worker/redis/lua``),
registered once. ``State``'s parts (``line_state``, ``scheduling``, ``pools``, ``views``) each
build on it; the rest of the code uses ``State`` only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import redis

LUA = Path(__file__).with_name("lua")


class Scripted:
    """A client with ``decode_responses`` (values come back as ``str``) and the scripts."""

    def __init__(self, client: redis.Redis[str]) -> None:
        self.client = client
        self._scripts = {
            path.stem: client.register_script(path.read_text()) for path in LUA.glob("*.lua")
        }

    def _run(self, name: str, keys_: list[str], args: list[Any]) -> Any:
        return self._scripts[name](keys=keys_, args=args)

    def run_script(self, name: str, keys_: list[str], args: list[Any]) -> Any:
        """Run ``lua/NAME.lua`` (for the other modules of ``worker.redis``)."""
        return self._run(name, keys_, args)

    def begin_hash(self, key: str, seq: int, owner: str) -> dict[str, str] | None:
        """``begin.lua`` on a line's or a group's hash: its fields if this dispatch (``seq``)
        is the latest and no copy of it began, else None."""
        raw = self._run("begin", [key], [seq, owner])
        return dict(zip(raw[::2], raw[1::2], strict=True)) if raw else None


def text(value: Any) -> str:
    """A value as a hash field holds it (floats exactly, dicts and lists as JSON)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict | list):
        return json.dumps(value)
    return repr(value) if isinstance(value, float) else str(value)
