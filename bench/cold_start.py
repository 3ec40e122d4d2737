"""What one message costs a device, phase by phase: on a SuperNode, Flower 1.41 starts a
new ClientApp process for every message, which imports the app, reads and tokenises the
node's data and builds the model again before it does the message's work.

For each message kind (query, train, evaluate) this starts a fresh Python process, as the
SuperNode does, that imports Flower's ClientApp runner and `client_app`, and calls the
handler on the message the server would send (the run config of `--config` with
`data.data-dir` set, the initial global model's arrays for this node as the strategy
tailors them). Phases are seconds since the process started (psutil's create_time):

- `handler`: the app is imported and the handler is called;
- `imports`: the modules the handler needs are imported (the app's own mark, else `handler`);
- `data`: the node's data is read and tokenised;
- `model`: the model is built and holds the received arrays;
- `first_step`: the first training step is done (train only);
- `reply`: the reply message is ready.

`modules` lists which of the heavy packages (WATCHED_MODULES) the process imported.

`data`, `model` and `first_step` come from the app's marks (`fedmoe_app.startup`); an app
without them reports null there. Each process gets `--repeats` turns; the first one meets
an empty token cache (a fresh cache folder per invocation; the OS's page cache is not
dropped), the later ones are summarised by their best run and their per-phase median.

Usage: python -m bench.cold_start --data-path DIR --tier rpi4 [--repeats 3]
       [--config conf/fft_moe.yaml] [--data-dir ../shared/data/ag_news] [--overrides ""]
       [--warm-worker true|false]
With the node worker on (the default on a device, see fedmoe_app/node_worker.py) the first
train message starts the worker, and the phases of later ones come from the train reply's
start-up seconds (the worker holds the marks). Prints one JSON object.
"""

# Only the standard library at module level: the child process (`--child`) imports this
# module, and whatever it imports would count as the app's start-up.
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KINDS = ("query", "train", "evaluate")
PHASES = ("handler", "imports", "data", "model", "first_step", "reply")
APP_MARKS = {"imports": "imports", "data": "data", "model": "model", "first_step": "first-step"}
WATCHED_MODULES = ("torch", "transformers", "tokenizers", "peft", "datasets", "pyarrow", "flwr_datasets", "matplotlib")
RUN_ID, NODE_ID, SUPERLINK_NODE_ID = 1, 7, 1
APP_DIR = Path(__file__).resolve().parents[1]
DEFAULT_AG_NEWS = APP_DIR.parent / "shared" / "data" / "ag_news"


# ---------------------------------------------------------------------------- parent


def write_messages(config_path: str, overrides: str, data_dir: str, tier: str, data_path: str, out: Path,
                   env: dict, warm_worker: bool) -> None:
    """Write, for each kind, the content the server would send this node in round 1
    (`<kind>.json` + `<kind>.bin`) and the node's node_config (`node.json`). The node's
    budget comes from its answer to a query message, run as a child with `env`."""
    from flwr.app import ConfigRecord, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedmoe_app import messages as msg
    from fedmoe_app.budgets import DeviceBudget
    from fedmoe_app.config import config_to_yaml, load_config
    from fedmoe_app.data import load_splits
    from fedmoe_app.methods import method_class
    from fedmoe_app.model import num_layers, state_to_numpy
    from strategies import make_strategy
    from strategies.base import Node

    config = load_config(config_path, f"{overrides} data.data-dir={data_dir}".strip())
    node_config = {"device-tier": tier, "data-path": str(Path(data_path).resolve()), "warm-worker": warm_worker}
    (out / "node.json").write_text(json.dumps(node_config))
    # What SparseStrategy.discover and SparseStrategy.start send.
    save_content(RecordDict({msg.CONFIG: ConfigRecord({msg.RUN_CONFIG: config_to_yaml(config)})}), out / "query")
    reply = _run_child("query", out, env)["reply"]
    node = Node(NODE_ID, str(reply[msg.NODE][msg.CLIENT_ID]), DeviceBudget.from_record(reply[msg.BUDGET]),
                int(reply[msg.NODE][msg.NUM_EXAMPLES]))
    strategy = make_strategy(config, num_layers(config))
    model = method_class(config.strategy).global_model(config, load_splits(config.data, config.seed).num_labels)
    strategy.global_arrays = state_to_numpy(model)
    # Messages are built in a ServerApp process, which knows its run and task.
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = RUN_ID, 1, SUPERLINK_NODE_ID
    sent = strategy.arrays_for(node, 1)
    for kind, message_type in (("train", MessageType.TRAIN), ("evaluate", MessageType.EVALUATE)):
        save_content(strategy._message(node, 1, message_type, ConfigRecord(), sent).content, out / kind)


def save_content(content, stem: Path) -> None:
    """A message's RecordDict of ConfigRecords and ArrayRecords as `stem.json` (configs,
    array headers) and `stem.bin` (the arrays' bytes, as sent)."""
    from flwr.app import ArrayRecord

    spec: dict = {"configs": {}, "arrays": {}}
    with stem.with_suffix(".bin").open("wb") as blob:
        for name, record in content.items():
            if isinstance(record, ArrayRecord):
                spec["arrays"][name] = []
                for key, array in record.items():
                    spec["arrays"][name].append([key, array.dtype, list(array.shape), array.stype, blob.tell(), len(array.data)])
                    blob.write(array.data)
            else:
                spec["configs"][name] = dict(record)
    stem.with_suffix(".json").write_text(json.dumps(spec))


def _run_child(kind: str, folder: Path, env: dict) -> dict:
    """Run the message `folder/<kind>.*` in a fresh process; its JSON line (phases, reply)."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.cold_start", "--child", kind, "--message-dir", str(folder)],
        cwd=APP_DIR, capture_output=True, text=True, env=env, timeout=900,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the {kind} process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _summary(runs: list[dict]) -> dict:
    """First run; best later run (smallest `reply`) and per-phase median of the later runs."""
    later = runs[1:]
    out: dict = {"first": runs[0]["phases"]}
    if later:
        out["later_best"] = min(later, key=lambda r: r["phases"]["reply"])["phases"]
        out["later_median"] = {
            p: (statistics.median(v) if (v := [r["phases"][p] for r in later if r["phases"][p] is not None]) else None)
            for p in PHASES
        }
    return out


def _fresh_cache_env(cache: Path) -> dict:
    """The environment with an empty fedmoe cache folder: the first turn pays for
    tokenising, as a new device does."""
    return {**os.environ, "FEDMOE_CACHE_DIR": str(cache)}


def measure(data_path: str, tier: str, repeats: int, config_path: str, overrides: str, data_dir: str,
            warm_worker: bool = True) -> dict:
    """Phases of every message kind, `repeats` fresh processes each (see the module docstring)."""
    from fedmoe_app import messages as msg

    with tempfile.TemporaryDirectory(prefix="fedmoe-cold-start-") as tmp:
        folder = Path(tmp)
        env = _fresh_cache_env(folder / "cache")
        write_messages(config_path, overrides, data_dir, tier, data_path, folder, env, warm_worker)
        runs: dict[str, list[dict]] = {kind: [] for kind in KINDS}
        load_before = os.getloadavg()[0]
        try:
            for _ in range(repeats):
                for kind in KINDS:  # the order a run sends them in
                    runs[kind].append(_run_child(kind, folder, env=env))
        finally:
            if warm_worker:
                _stop_worker(env)
    return {
        "tier": tier, "data_path": str(Path(data_path).resolve()), "config": config_path, "overrides": overrides,
        "warm_worker": warm_worker,
        "repeats": repeats, "cpu_count": os.cpu_count(), "python": sys.version.split()[0],
        "load_average_1min": [load_before, os.getloadavg()[0]],  # other work on the machine skews the figures
        "phases": list(PHASES),
        "kinds": {kind: {**_summary(r), "runs": [x["phases"] for x in r], "modules": r[-1]["modules"]}
                  for kind, r in runs.items()},
        "train_reply_seconds": {k: v for k, v in runs["train"][-1]["reply"][msg.METRICS].items() if k.endswith("-seconds")},
    }


def _stop_worker(env: dict) -> None:
    """Stop the node worker the children started with `env`'s cache folder, if any."""
    from fedmoe_app import node_worker

    saved = os.environ.get("FEDMOE_CACHE_DIR")
    os.environ["FEDMOE_CACHE_DIR"] = env["FEDMOE_CACHE_DIR"]
    try:
        node_worker.stop(node_worker.socket_path(os.getpid()))  # the children's parent is this process
    finally:
        if saved is None:
            os.environ.pop("FEDMOE_CACHE_DIR")
        else:
            os.environ["FEDMOE_CACHE_DIR"] = saved


# ---------------------------------------------------------------------------- child


def child(kind: str, message_dir: Path) -> None:
    """Be a ClientApp process for one message: import what flwr-clientapp imports, then the
    app, call its handler, print the phases and the reply's plain values as one JSON line."""
    from flwr.supernode.cli import flwr_clientapp  # noqa: F401  (the real process's own imports)

    sys.path.insert(0, str(APP_DIR))
    import client_app

    message, context = _message(kind, message_dir)
    handler = time.time()
    reply = client_app.app(message, context)
    replied = time.time()
    if reply.has_error():
        raise RuntimeError(f"the {kind} handler replied with an error: {reply.error.reason}")

    import psutil

    start = psutil.Process().create_time()
    marks = _app_marks()
    from fedmoe_app import messages as msg  # after the app's marks: not part of its start-up

    phases = {"handler": handler - start, "reply": replied - start}
    for phase, name in APP_MARKS.items():
        phases[phase] = marks[name] - start if name in marks else None
    metrics = dict(reply.content[msg.METRICS]) if msg.METRICS in reply.content else {}
    if phases["data"] is None and "startup-seconds" in metrics:  # a node worker did the work
        phases.update(_phases_from_metrics(metrics))
    if phases["imports"] is None:
        phases["imports"] = phases["handler"]  # an app that imports everything up front
    print(json.dumps({
        "kind": kind,
        "phases": {p: phases[p] for p in PHASES},
        "modules": [m for m in WATCHED_MODULES if m in sys.modules],
        "reply": _plain(reply.content),
    }))


def _phases_from_metrics(metrics: dict) -> dict[str, float]:
    """Phase ends (seconds since this process started) from a train reply's start-up
    seconds, when another process (the node worker) did the work and holds the marks."""
    imports = metrics["import-seconds"]
    data = imports + metrics["data-seconds"]
    return {"imports": imports, "data": data, "model": data + metrics["model-seconds"],
            "first_step": metrics["startup-seconds"]}


def _app_marks() -> dict[str, float]:
    """The app's own phase marks, if it has them (`fedmoe_app.startup.MARKS`)."""
    if importlib.util.find_spec("fedmoe_app.startup") is None:
        return {}
    from fedmoe_app import startup

    return dict(startup.MARKS)


def _message(kind: str, message_dir: Path):
    """The Message (saved by `save_content`) and Context the SuperNode would hand the ClientApp."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict
    from flwr.app.constants import DEFAULT_TTL

    spec = json.loads((message_dir / f"{kind}.json").read_text())
    blob = (message_dir / f"{kind}.bin").read_bytes()
    content = RecordDict({name: ConfigRecord(values) for name, values in spec["configs"].items()})
    for name, arrays in spec["arrays"].items():
        content[name] = ArrayRecord({
            key: Array(dtype=dtype, shape=tuple(shape), stype=stype, data=blob[offset:offset + size])
            for key, dtype, shape, stype, offset, size in arrays
        })
    metadata = Metadata(
        run_id=RUN_ID, message_id=f"{kind}-{os.getpid()}", src_node_id=SUPERLINK_NODE_ID, dst_node_id=NODE_ID,
        reply_to_message_id="", group_id="1", created_at=time.time(), ttl=DEFAULT_TTL, message_type=kind,
    )
    node_config = json.loads((message_dir / "node.json").read_text())
    context = Context(run_id=RUN_ID, node_id=NODE_ID, node_config=node_config, state=RecordDict(), run_config={})
    return Message(content=content, metadata=metadata), context


def _plain(content) -> dict:
    """The reply's config and metric records by name, as plain dicts (arrays left out)."""
    from fedmoe_app import messages as msg

    return {name: dict(content[name]) for name in (msg.NODE, msg.BUDGET, msg.METRICS, msg.REQUEST) if name in content}


# ---------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> None:
    """Command line: measure every message kind and print the JSON (or be one child)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-path", help="the node's data folder (train.csv, test.csv), its node_config data-path")
    parser.add_argument("--tier", default="rpi4", help="the node's device-tier")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per message kind")
    parser.add_argument("--config", default="conf/fft_moe.yaml", help="the run's YAML config")
    parser.add_argument("--overrides", default="", help="'key=value ...' on top of the config")
    parser.add_argument("--data-dir", default=str(DEFAULT_AG_NEWS), help="the run config's data.data-dir")
    parser.add_argument("--warm-worker", choices=("true", "false"), default="true",
                        help="node_config warm-worker: messages served by a node worker (default, as on a device)")
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--message-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.message_dir)
        return
    if not args.data_path:
        parser.error("--data-path is required")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    result = measure(args.data_path, args.tier, args.repeats, args.config, args.overrides, args.data_dir,
                     args.warm_worker == "true")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
