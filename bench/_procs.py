"""Bench worker processes spoken to with one JSON line per command and one per answer, and
the garbage-collector tuning every load process does."""

from __future__ import annotations

import contextlib
import gc
import json
import subprocess
import sys
from typing import Any, Self

#: meshpush.server.node.GC_THRESHOLDS; not imported from there: meshpush.server.node brings
#: trio-asyncio, whose asyncio patches made the raw JetStream floor's process ~4x slower (its CPU
#: 1.0 -> 4.4 s)
GC_THRESHOLDS = (10_000, 20, 10)


def tune_gc() -> None:
    """As the nodes do: what exists now (sessions, modules) frozen out of the collector's
    scans, young collections less often (a receiver's full collections took ~100 ms)."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


class Procs:
    """One ``python -m module *argv`` process per ``argvs`` entry; stopped by ``close``."""

    def __init__(self, module: str, argvs: list[list[str]]) -> None:
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-m", module, *argv],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for argv in argvs
        ]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, commands: list[dict[str, Any]]) -> None:
        """One command to each worker, all at once."""
        for proc, cmd in zip(self.procs, commands, strict=True):
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(cmd) + "\n")
            proc.stdin.flush()

    def answers(self) -> list[Any]:
        """One answer from each worker (each command has its own timeout in the worker)."""
        out = []
        for proc in self.procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"bench worker {proc.pid} died (exit {proc.poll()})")
            out.append(json.loads(line))
        return out

    def ask(self, commands: list[dict[str, Any]]) -> list[Any]:
        self.send(commands)
        return self.answers()

    def cpu(self) -> list[float]:
        from bench._targets import cpu_seconds

        return [cpu_seconds(p.pid) for p in self.procs]

    def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(OSError, ValueError):
                assert proc.stdin is not None
                proc.stdin.write('{"op": "close"}\n')
                proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
