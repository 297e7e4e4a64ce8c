"""The walk of one line from ``imagebatch run`` to its row: which of imagebatch's modules it
passes through, in order, and where the way through them doubles back.

Runs ``imagebatch run`` in this process (the embedded default: Redis, an in-process worker and
the built-in simulator) on a one-line manifest and watches every call between imagebatch's
modules (``jobs/`` and ``worker/``; the simulator excluded: it is the provider), in every
thread. A *hop* is a call from one module into another (each caller → callee pair counted
once); a *return* is a hop into a module that is already a caller further up the same stack
(the callee calls back into a module it came from: ping-pong). What runs while a module is
being imported (its body, its classes' bodies, the calls they make) is not part of the walk.

    .venv/bin/python bench/walk.py [-v]                     # this checkout
    BENCH_CODE=DIR .venv/bin/python -P bench/walk.py [-v]   # another checkout's code
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType
from typing import Any

if os.environ.get("BENCH_CODE"):
    sys.path.insert(0, os.environ["BENCH_CODE"])
else:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

HUB = (
    "worker.redis.state",
    "worker.redis.line_state",
    "worker.redis.scheduling",
    "worker.redis.pools",
    "worker.redis.views",
    "worker.redis.scripts",
    "worker.dispatch.runner",
    "worker.state",
    "worker.runner",
)
"""Modules a walk may come back to by design: the state store (``State`` and the modules it is
built from) and the runner."""


def ours(module: str) -> bool:
    return module.startswith(("jobs", "worker")) and not module.startswith("jobs.simulator")


def importing(frame: FrameType) -> bool:
    """The frame runs while a module is being imported: a module's or a class's body, or a
    call made from one (the same for its call and its return, so the stacks stay paired)."""
    if not frame.f_code.co_flags & inspect.CO_OPTIMIZED:
        return True
    back = frame.f_back
    while back is not None:
        if back.f_code.co_name == "<module>" and back.f_globals.get("__name__") != "__main__":
            return True
        back = back.f_back
    return False


class Watcher:
    """Follows each thread's stack of imagebatch modules through call and return events."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.stacks: dict[int, list[str]] = {}
        self.first_seen: list[str] = []
        self.hops: set[tuple[str, str]] = set()
        self.returns: dict[tuple[str, str], str] = {}

    def profile(self, frame: FrameType, event: str, arg: Any) -> None:
        if event not in ("call", "return"):
            return
        module = frame.f_globals.get("__name__", "")
        if not ours(module) or importing(frame):
            return
        stack = self.stacks.setdefault(threading.get_ident(), [])
        if event == "return":
            if stack:
                stack.pop()
            return
        caller = stack[-1] if stack else None
        with self.lock:
            if module not in self.first_seen:
                self.first_seen.append(module)
            if caller is not None and caller != module:
                self.hops.add((caller, module))
                if module in stack:
                    self.returns.setdefault((caller, module), frame.f_code.co_qualname)
        stack.append(module)


def main() -> None:
    verbose = "-v" in sys.argv
    watcher = Watcher()
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "one.jsonl"
        manifest.write_text(json.dumps({"id": "mug", "prompt": "a white mug"}) + "\n")
        os.environ["IMAGEBATCH_EMBEDDED_SIMULATOR_LATENCY_S"] = "0.2"
        os.environ["IMAGEBATCH_REPORT_PREVIEWS"] = "0"
        sys.argv = ["imagebatch", "run", str(manifest), "--provider", "simulator", "--out", tmp]
        from worker.cli import main as cli

        threading.setprofile(watcher.profile)
        sys.setprofile(watcher.profile)
        try:
            cli()
        except SystemExit:
            pass
        finally:
            sys.setprofile(None)
            threading.setprofile(None)
    returns = watcher.returns
    off_hub = {edge: name for edge, name in returns.items() if edge[1] not in HUB}
    print(
        f"modules: {len(watcher.first_seen)} · hops (caller → callee pairs): "
        f"{len(watcher.hops)} · returns to a module already on the stack: {len(returns)}, "
        f"{len(off_hub)} of them not to the hub (State, the runner)"
    )
    print("modules, in the order the walk first reaches them:")
    print("  " + " → ".join(watcher.first_seen))
    if verbose or off_hub:
        print("returns (caller → callee: function), * where not to the hub:")
        for (caller, callee), name in sorted(returns.items()):
            print(f"  {'*' if (caller, callee) in off_hub else ' '} {caller} → {callee}: {name}")


if __name__ == "__main__":
    main()
