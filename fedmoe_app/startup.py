"""When a ClientApp process got its imports, data, model and first training step done.

On a SuperNode each message runs in a new process, so a message pays for its own start-up;
these marks say where that time went. `mark` records a wall-clock timestamp under a name
(the last one wins); `phase_seconds` turns the marks into the seconds a train reply
reports. Standard library only at import: a query must not pull in more.
"""

from __future__ import annotations

import time

MARKS: dict[str, float] = {}  # name -> time.time() of the latest mark
_messages = 0  # messages this process has begun


def mark(name: str) -> None:
    """Record that `name` (imports, data, model, first-step) is done now."""
    MARKS[name] = time.time()


def begin_message() -> None:
    """A handler starts serving a message."""
    global _messages
    _messages += 1
    mark("message")


def process_start() -> float:
    """When this process started (seconds since the epoch)."""
    import psutil

    return psutil.Process().create_time()


def phase_seconds() -> dict[str, float]:
    """Seconds this message spent before its first training step: `import-seconds`,
    `data-seconds` (read and tokenise), `model-seconds` (build it, load the received
    arrays) and their total from the start, `startup-seconds`. The start is the process's
    start for its first message; a process that serves several (simulation) counts later
    messages from their handler's start, and what an earlier message did costs them 0."""
    origin = process_start() if _messages <= 1 else MARKS.get("message", time.time())
    bounds = [origin]
    for name in ("imports", "data", "model", "first-step"):
        bounds.append(max(bounds[-1], MARKS.get(name, bounds[-1])))
    imports, data, model = (bounds[i + 1] - bounds[i] for i in range(3))
    return {"import-seconds": imports, "data-seconds": data, "model-seconds": model,
            "startup-seconds": bounds[-1] - origin}
