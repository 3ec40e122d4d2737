"""When a ClientApp process got its imports, data, model and first training step done.

On a SuperNode each message runs in a new process, so a message pays for its own start-up;
these marks say where that time went. `mark` records a wall-clock timestamp under a name
(the last one wins); `phase_seconds` turns the marks into the seconds a train reply
reports. Standard library only at import: a query must not pull in more.
"""

from __future__ import annotations

import time

MARKS: dict[str, float] = {}  # name -> time.time() of the latest mark
PHASE_METRICS = ("startup-seconds", "import-seconds", "data-seconds", "model-seconds")  # what phase_seconds reports
_messages = 0  # messages this process has begun
_origin: float | None = None  # when the current message's process started, if known


def mark(name: str) -> None:
    """Record that `name` (imports, data, model, first-step) is done now."""
    MARKS[name] = time.time()


def begin_message(origin: float | None = None) -> None:
    """A handler starts serving a message; `origin` is when the process that received it
    started, when that is another process (the ClientApp that handed it to a node worker)."""
    global _messages, _origin
    _messages += 1
    _origin = origin
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
    messages from their handler's start, and what an earlier message did costs them 0.
    A message handed over to a node worker counts from the start of the ClientApp process
    that received it, and its imports end when the worker has it."""
    if _origin is not None:
        origin = _origin
    else:
        origin = process_start() if _messages <= 1 else MARKS.get("message", time.time())
    bounds = [origin]
    for name in ("imports", "data", "model", "first-step"):
        end = MARKS.get(name, bounds[-1])
        if name == "imports" and _origin is not None:
            end = max(end, MARKS.get("message", end))
        bounds.append(max(bounds[-1], end))
    imports, data, model = (bounds[i + 1] - bounds[i] for i in range(3))
    return dict(zip(PHASE_METRICS, (bounds[-1] - origin, imports, data, model)))
