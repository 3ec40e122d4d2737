"""Every command the README and its reference page (docs/USAGE.md) show is run here, in a
short version: a tiny random backbone (MiniLM for `make run` itself), one round, 3 simulated
nodes, the benchmarks as `--smoke`, in a private Flower home on free ports, with results,
caches and deployments in temporary folders. The commands are read from README.md and
docs/USAGE.md, so a command added to either fails test_every_readme_command_is_run_here
until a short version of it runs here.

The tests run in file order and share one local SuperLink; `make stop` (last) stops it.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
from pathlib import Path

import psutil
import pytest
import yaml

from bench.simulation import LocalSimulation
from fedmoe_app.checkpoint import load_checkpoint
from fedmoe_app.config import APP_DIR, load_config
from fedmoe_app.faults import fault_of
from fedmoe_app.results import RunResults
from fedmoe_app import messages as msg

README = APP_DIR / "README.md"
USAGE = APP_DIR / "docs" / "USAGE.md"  # the reference the README points to; its commands are run here too
README_MAX_LINES = 200  # the README is a front door (issue 27); the reference lives in docs/
TINY = "model.backbone=tiny-bert data.max-train-rows=300 eval.test-samples=100 moe.num-experts=4 moe.expert-hidden=8 rounds=1"
MINILM = "rounds=1 data.max-train-rows=300 eval.test-samples=200 moe.num-experts=4"
NODES = 3
TIMEOUT_S = 600

BASH_BLOCK = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)
ANY_BLOCK = re.compile(r"^```.*?^```", re.S | re.M)
CODE_SPAN = re.compile(r"`([^`]+)`")


def readme_commands(text: str) -> list[str]:
    """The commands a README shows: each line of its ```bash blocks (comments dropped,
    continuations joined) and each code span in its prose that starts with `make` or `flwr`,
    or is an `OVERRIDES="..."` argument (of `make run`); whitespace collapsed."""
    commands = []
    for block in BASH_BLOCK.findall(text):
        for line in re.sub(r"\\\n\s*", "", block).splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(" ".join(line.split()))
    for span in CODE_SPAN.findall(ANY_BLOCK.sub("", text)):
        span = " ".join(span.split())
        if span.startswith("OVERRIDES="):
            commands.append(f"make run {span}")
        elif span == "make" or span.startswith(("make ", "flwr ")):
            commands.append(span)
    return list(dict.fromkeys(commands))


def shortened(command: str, extra: str) -> str:
    """`command` (a make command) with `extra` appended to its OVERRIDES (added if absent)."""
    if 'OVERRIDES="' in command:
        return re.sub(r'OVERRIDES="([^"]*)"', lambda m: f'OVERRIDES="{m.group(1)} {extra}"', command, count=1)
    return f'{command} OVERRIDES="{extra}"'


class Shell:
    """Runs commands as a user would in the repository's folder: a private Flower home (its
    default connection simulates NODES nodes), and `make`'s results, data, deployment and
    cache folders in temporary places."""

    def __init__(self, simulation: LocalSimulation, root: Path, data_dir: Path) -> None:
        self.simulation = simulation
        self.results = root / "results"
        self.env = {
            **simulation.env,
            "RESULTS_DIR": str(self.results),
            "DATA_DIR": str(data_dir),
            "DEPLOY_DIR": str(root / "deploy"),
            "FEDMOE_CACHE_DIR": str(root / "cache"),
        }

    def run(self, command: str, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run `command` in bash; stdout and stderr together in `.stdout`."""
        return subprocess.run(["bash", "-c", command], cwd=APP_DIR, env={**self.env, **(env or {})}, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=TIMEOUT_S)

    def popen(self, command: str) -> subprocess.Popen:
        """Start `command` in a process group of its own, as a terminal's foreground job: with
        Ctrl-C's default action even where pytest itself runs with SIGINT ignored (a background
        job of a non-interactive shell: `make test &`), which every child would inherit."""
        return subprocess.Popen(["bash", "-c", command], cwd=APP_DIR, env=self.env, text=True, start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.fixture(scope="module")
def shell(tmp_path_factory, ag_news_dir):
    with LocalSimulation(tmp_path_factory.mktemp("flwr-home"), num_supernodes=NODES) as simulation:
        yield Shell(simulation, tmp_path_factory.mktemp("readme"), ag_news_dir)


def ok(done: subprocess.CompletedProcess) -> str:
    """The output of a command that must have succeeded."""
    assert done.returncode == 0, f"exit {done.returncode}:\n{done.stdout[-4000:]}"
    return done.stdout


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def completed(run_dir: Path, rounds: int = 1) -> dict:
    """The resolved config of a run that completed `rounds` rounds with every node replying."""
    assert json.loads((run_dir / "status.json").read_text())["status"] == "complete"
    assert [r["round"] for r in records(run_dir)] == list(range(rounds + 1))
    assert (run_dir / "summary.json").is_file() and (run_dir / "adapter.safetensors").is_file()
    return yaml.safe_load((run_dir / "config.yaml").read_text())


def write_rows(path: Path, rows: list[tuple[str, str]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)


def own_data(folder: Path, ag_news_dir: Path, names: tuple[str, ...] | None) -> Path:
    """A small dataset folder cut from AG News, its labels as names when `names` is given."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", 300), ("test", 100)):
        with (ag_news_dir / f"{split}.csv").open(newline="") as f:
            rows = [(r["text"], names[int(r["label"])] if names else r["label"]) for _, r in zip(range(count), csv.DictReader(f))]
        write_rows(folder / f"{split}.csv", rows)
    return folder


# ------------------------------------------------------------------------------ coverage
# README / docs/USAGE.md command -> the test below that runs its short version.
RUN_BY = {
    "make run": "test_make_run",
    "flwr run": "test_make_run",  # `make run` runs `flwr run . local-simulation`
    "make test": "test_make_test",
    "make run CONFIG=conf/ub_smoe.yaml,conf/instruction.yaml": "test_make_run_instruction_tuning",  # README, "### Tasks"
    'make run CONFIG=conf/fft_moe.yaml,conf/instruction.yaml OVERRIDES="model.backbone=tiny-olmoe"':
        "test_make_run_instruction_tuning",
    "make run CONFIG=conf/fedavg_lora.yaml": "test_make_run_with_another_strategy",
    "make run CONFIG=conf/hfedmoe.yaml": "test_make_run_with_another_strategy",
    "make run CONFIG=conf/ub_smoe.yaml": "test_make_run_with_another_strategy",
    'make run OVERRIDES="data.alpha=0.1 rounds=10 loss.heterogeneity=0"': "test_make_run_with_overrides",
    'make run OVERRIDES="devices.simulation-mix={rpi4: 1.0}"': "test_a_mapping_override_replaces_the_default",
    "FLWR_HOME=$PWD/.flwr .venv/bin/python -m fedmoe_app.launch --config conf/fedavg_lora.yaml "
    '--overrides "data.partitioner=iid" --data-dir ../shared/data/ag_news': "test_the_same_without_make",
    'make run OVERRIDES="resume=<run-name>"': "test_ctrl_c_stops_the_run_and_resume_finishes_it",
    "make run DATA_DIR=/path/to/folder": "test_your_own_data_folder",
    'make run OVERRIDES="data.data-dir=/path"': "test_your_own_data_folder",
    'make run OVERRIDES="data.dataset=<hub id>"': "test_a_hub_dataset",
    'make run OVERRIDES="faults.share=0.2 federation.round-timeout=30"': "test_injected_faults_are_counted",
    'make run CONFIG=conf/fft_moe.yaml OVERRIDES="data.alpha=0.1 run-name=readme-fft_moe-dir01"': "test_results_commands",
    'make run CONFIG=conf/fedavg_lora.yaml OVERRIDES="data.alpha=0.1 run-name=readme-fedavg_lora-dir01"':
        "test_results_commands",
    "make deploy-local": "test_deploy_local_tls",
    "flwr run . <connection>": "test_deploy_local_tls",  # what make deploy-local runs
    "flwr supernode register": "test_deploy_local_tls",  # make deploy-local registers every node's key
    'make deploy-local OVERRIDES="rounds=3 run-name=deploy-minilm-tls"': "test_deploy_local_tls",
    "make deploy-local DEPLOY_MODE=insecure": "test_deploy_local_insecure",
    "make certs": "test_make_certs",
    "make bench-quick": "test_benchmarks",
    "make bench-skew": "test_benchmarks",
    "make bench": "test_benchmarks",
    "make bench-budgets": "test_benchmarks",
    "make bench-remedies": "test_benchmarks",
    "make bench-headline": "test_benchmarks",
    "make bench-calibration": "test_benchmarks",
    'make run OVERRIDES="data.alpha=0.1 calibration.method=ccvr"': "test_make_run_with_calibration",
    'make bench-quick BENCH_ARGS="--smoke"': "test_benchmarks",
    "flwr ls": "test_flwr_ls_and_log",
    "flwr log": "test_flwr_ls_and_log",
    "make stop": "test_make_stop",
    ".venv/bin/python -m bench.paired --runs docs/runs/issue15/full-runs.tar.gz --partitions dir0.1 --mix mixed "
    "--strategies ub_smoe,fft_moe,flexlora,head_only": "test_reading_the_run_records",
}


def test_readme_commands_are_read_from_blocks_and_spans():
    text = (
        "Run `make run` or `make run OVERRIDES=\"a=1\n b=2\"`; `OVERRIDES=\"c=3\"` too. Not `pip x` nor `conf/x.yaml`.\n"
        "```bash\nmake test   # the tests\nFOO=1 python -m x \\\n    --y 2\n```\n```\nmake output-not-a-command\n```\n"
    )
    assert readme_commands(text) == ["make test", "FOO=1 python -m x --y 2", "make run", 'make run OVERRIDES="a=1 b=2"',
                                     'make run OVERRIDES="c=3"']
    assert shortened('make run X=1 OVERRIDES="a=1"', "b=2") == 'make run X=1 OVERRIDES="a=1 b=2"'
    assert shortened("make run", "b=2") == 'make run OVERRIDES="b=2"'


def test_every_readme_command_is_run_here():
    commands = list(dict.fromkeys(readme_commands(README.read_text()) + readme_commands(USAGE.read_text())))
    missing = [c for c in commands if c not in RUN_BY]
    assert not missing, f"README / docs/USAGE.md commands without a short version in tests/test_readme.py: {missing}"
    stale = [c for c in RUN_BY if c not in commands]
    assert not stale, f"no longer in the README or docs/USAGE.md: {stale}"
    assert all(callable(globals().get(name)) for name in RUN_BY.values())


def test_the_readme_is_a_short_front_door_with_its_reference_in_docs():
    text = README.read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    assert "### Tasks" in text and "(docs/USAGE.md)" in text and "(docs/RESULTS.md)" in text
    assert "(docs/DEPLOY.md)" in text
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert images and all((APP_DIR / image).is_file() for image in images), images
    # every README section moved out is in the reference, key by key
    usage = USAGE.read_text()
    for key in ("train.device", "train.precision", "moe.dispatch", "federation.wire-dtype", "federation.server-optimizer",
                "train.logit-adjustment", "calibration.method", "eval.final-test-samples", "## Reliability", "## Layout"):
        assert key in usage, key


# ------------------------------------------------------------------------------ the commands
@pytest.mark.slow
def test_make_test(shell):
    output = ok(shell.run('make test PYTEST_ARGS="tests/test_config.py"'))
    assert re.search(r"\d+ passed", output)


@pytest.mark.slow
def test_make_run(shell):
    output = ok(shell.run(shortened("make run", f"{MINILM} run-name=readme-make-run")))
    run_dir = shell.results / "readme-make-run"
    config = completed(run_dir)
    assert config["strategy"] == "fft_moe" and config["model"]["backbone"] == "minilm"
    assert records(run_dir)[1]["num_replies"] == NODES and records(run_dir)[1]["failures"] == 0
    own = [line for line in output.splitlines() if line.strip() and not line.startswith("make[")]  # not make's own
    assert str(run_dir) in own[-1]  # the last line says where the results are


LM_TINY = ("rounds=1 data.max-train-rows=60 eval.test-samples=3 eval.final-test-samples=3 eval.max-length=64 "
           "instruction.benchmarks=[ARC-Easy,boolq]")


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for c in RUN_BY if RUN_BY[c] == "test_make_run_instruction_tuning"])
def test_make_run_instruction_tuning(shell, command):
    name = f"readme-lm-{len(command)}"
    output = ok(shell.run(shortened(command, f"{LM_TINY} run-name={name}")))
    config = completed(shell.results / name)
    assert config["task"] == "instruction" and config["data"]["data-dir"].endswith("shared/data/commonsense")
    assert "tiny-olmoe" in command or config["model"]["backbone"] == "tiny-llama"
    last = records(shell.results / name)[-1]
    assert last["num_replies"] == NODES and set(last["global_accuracy_by_benchmark"]) == {"ARC-Easy", "boolq"}
    assert "ppl" in output


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fedavg_lora", "hfedmoe", "ub_smoe"])
def test_make_run_with_another_strategy(shell, strategy):
    ok(shell.run(shortened(f"make run CONFIG=conf/{strategy}.yaml", f"{TINY} run-name=readme-{strategy}")))
    assert completed(shell.results / f"readme-{strategy}")["strategy"] == strategy


@pytest.mark.slow
def test_make_run_with_calibration(shell):
    ok(shell.run(shortened('make run OVERRIDES="data.alpha=0.1 calibration.method=ccvr"', f"{TINY} run-name=readme-ccvr")))
    run_dir = shell.results / "readme-ccvr"
    assert completed(run_dir)["calibration"]["method"] == "ccvr"
    assert records(run_dir)[-1]["calibration"]["nodes"] == NODES


@pytest.mark.slow
def test_make_run_with_overrides(shell):
    command = 'make run OVERRIDES="data.alpha=0.1 rounds=10 loss.heterogeneity=0"'
    ok(shell.run(shortened(command, f"{TINY} run-name=readme-overrides")))  # the later rounds=1 wins
    config = completed(shell.results / "readme-overrides")
    assert (config["data"]["alpha"], config["loss"]["heterogeneity"]) == (0.1, 0.0)


@pytest.mark.slow
def test_a_mapping_override_replaces_the_default(shell):
    command = 'make run OVERRIDES="devices.simulation-mix={rpi4: 1.0}"'
    ok(shell.run(shortened(command, f"{TINY} run-name=readme-mix")))
    run_dir = shell.results / "readme-mix"
    assert completed(run_dir)["devices"]["simulation-mix"] == {"rpi4": 1.0}
    assert {client["tier"] for client in records(run_dir)[1]["clients"].values()} == {"rpi4"}


@pytest.mark.slow
def test_the_same_without_make(shell, ag_news_dir):
    command = next(c for c in RUN_BY if c.startswith("FLWR_HOME="))
    command = command.replace("$PWD/.flwr", str(shell.simulation.flwr_home))  # the private home, not the user's
    command = command.replace('"data.partitioner=iid"', f'"data.partitioner=iid {TINY} run-name=readme-no-make"')
    if not (APP_DIR / "../shared/data/ag_news").is_dir():
        command = command.replace("../shared/data/ag_news", str(ag_news_dir))
    ok(shell.run(f"{command} --results-dir {shell.results}"))
    config = completed(shell.results / "readme-no-make")
    assert (config["strategy"], config["data"]["partitioner"]) == ("fedavg_lora", "iid")


STOPPED_ROUNDS = 40


@pytest.mark.slow
def test_ctrl_c_stops_the_run_and_resume_finishes_it(shell):
    """Ctrl-C in `make run` (SIGINT to the terminal's foreground process group) stops the run
    on the SuperLink and says how to resume; the README's resume command finishes it."""
    # 40 rounds of about a second each: the log stream reaches us seconds behind the run, and
    # a shorter run could end before the Ctrl-C we send when round 1's line arrives
    process = shell.popen(shortened("make run", f"{TINY} rounds={STOPPED_ROUNDS} run-name=readme-stopped"))
    lines = []
    for line in process.stdout:
        lines.append(line)
        if f"round  1/{STOPPED_ROUNDS}" in line:
            os.killpg(process.pid, signal.SIGINT)
            break
    output = "".join(lines) + process.communicate(timeout=300)[0]
    assert process.returncode != 0, output[-3000:]
    assert 'make run OVERRIDES="resume=readme-stopped"' in output, output[-3000:]
    run_dir = shell.results / "readme-stopped"
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "stopped" and 1 <= status["last_round"] < STOPPED_ROUNDS, (status, output[-3000:])
    assert load_checkpoint(run_dir).server_round == status["last_round"]
    # a ServerApp stopped between a round's record and its checkpoint leaves one record past it
    assert records(run_dir)[-1]["round"] - status["last_round"] in (0, 1)
    assert not RunResults.at(run_dir).writer_running()  # the ServerApp has ended: nothing more is written
    run_id = re.search(r"run (\d{6,})", output).group(1)
    listed = ok(shell.run(f"flwr ls --run-id {run_id} --format json"))
    assert json.loads(listed)["runs"][0]["status"] == "finished:stopped", listed  # on the SuperLink, not only the log

    command = 'make run OVERRIDES="resume=<run-name>"'.replace("<run-name>", "readme-stopped")
    output = ok(shell.run(command))
    assert f"resuming readme-stopped after round {status['last_round']}" in output, output[-5000:]
    completed(run_dir, rounds=STOPPED_ROUNDS)


@pytest.mark.slow
def test_your_own_data_folder(shell, ag_news_dir, tmp_path):
    named = own_data(tmp_path / "named", ag_news_dir, ("business", "sci-tech", "sports", "world"))
    ok(shell.run(shortened(f"make run DATA_DIR={named}", f"{TINY} run-name=readme-data-dir")))
    run_dir = shell.results / "readme-data-dir"
    assert completed(run_dir)["data"]["data-dir"] == str(named)
    assert json.loads((run_dir / "labels.json").read_text()) == {"0": "business", "1": "sci-tech", "2": "sports", "3": "world"}

    numbered = own_data(tmp_path / "numbered", ag_news_dir, None)
    command = 'make run OVERRIDES="data.data-dir=/path"'.replace("/path", str(numbered))
    ok(shell.run(shortened(command, f"{TINY} run-name=readme-data-override")))
    run_dir = shell.results / "readme-data-override"
    assert completed(run_dir)["data"]["data-dir"] == str(numbered) and not (run_dir / "labels.json").exists()


@pytest.mark.slow
def test_a_hub_dataset(shell, ag_news_dir, tmp_path):
    """The hub is unreachable here: `datasets.load_dataset` takes a local dataset folder in
    place of a hub id, through the same hub-loading code. `make run` passes the AG News copy
    as DATA_DIR: a dataset named explicitly must not be read from it."""
    hub = own_data(tmp_path / "hub-dataset", ag_news_dir, None)
    with (hub / "train.csv").open() as f:
        train_rows = sum(1 for _ in f) - 1
    command = 'make run OVERRIDES="data.dataset=<hub id>"'.replace("<hub id>", str(hub))
    output = ok(shell.run(shortened(command, f"{TINY} run-name=readme-hub")))
    assert f"from the Hugging Face hub ({hub})" in output
    config = completed(shell.results / "readme-hub")
    assert (config["data"]["dataset"], config["data"]["data-dir"]) == (str(hub), "")
    assert sum(c["num_examples"] for c in records(shell.results / "readme-hub")[1]["clients"].values()) <= train_rows


def round_one_faults(seed: int) -> list[str | None]:
    """The fault each simulated node injects in round 1 under the README's faults.share=0.2."""
    config = load_config("conf/fft_moe.yaml", f"faults.share=0.2 seed={seed}")
    return [fault_of(config, {msg.PARTITION_ID: p, msg.NUM_PARTITIONS: NODES}, 1) for p in range(NODES)]


@pytest.mark.slow
def test_injected_faults_are_counted(shell):
    command = 'make run OVERRIDES="faults.share=0.2 federation.round-timeout=30"'
    seed = next(s for s in range(100) if "hang" not in round_one_faults(s))  # a hang would wait out the 30 s
    faults = round_one_faults(seed)
    assert sum(f is not None for f in faults) == 1  # ceil(0.2 x 3 nodes)
    ok(shell.run(shortened(command, f"{TINY} seed={seed} run-name=readme-faults")))
    record = records(shell.results / "readme-faults")[1]
    assert record["failures"] == 1 and record["num_replies"] == NODES - 1
    reasons = json.dumps(record["failed_nodes"])
    assert ("injected fault: raise" in reasons) if "raise" in faults else ("not finite" in reasons or "NaN" in reasons), reasons


@pytest.mark.slow
def test_results_commands(shell):
    for command in [c for c in RUN_BY if RUN_BY[c] == "test_results_commands"]:
        ok(shell.run(shortened(command, TINY)))
        name = re.search(r"run-name=(\S+)\"", command).group(1)
        config = completed(shell.results / name)
        assert config["data"]["alpha"] == 0.1 and config["strategy"] in name


def deployment_processes(deploy_dir: Path) -> list[int]:
    """Processes still running whose command line names the deployment's folder."""
    return [p.pid for p in psutil.process_iter(["cmdline"]) if str(deploy_dir) in " ".join(p.info["cmdline"] or [])]


@pytest.mark.slow
def test_deploy_local_tls(shell):
    """`make deploy-local` (TLS, node keys registered with `flwr supernode register`, the app
    started with `flwr run . <connection>`), short: two SuperNodes, tiny backbone."""
    for command, name in (("make deploy-local", "readme-deploy-tls"),
                          ('make deploy-local OVERRIDES="rounds=3 run-name=deploy-minilm-tls"', "deploy-minilm-tls")):
        extra = TINY if "run-name" in command else f"{TINY} run-name={name}"
        output = ok(shell.run(shortened(command, extra) + " DEPLOY_TIERS=rpi4,jetson-nano"))
        assert "fedmoe deploy: tls, 2 SuperNodes (rpi4, jetson-nano)" in output and "finished:completed" in output
        assert records(shell.results / name)[1]["num_replies"] == 2
    credentials = Path(shell.env["DEPLOY_DIR"]) / "credentials"
    assert (credentials / "nodes" / "node-0.pub").is_file()
    assert not deployment_processes(Path(shell.env["DEPLOY_DIR"]))


@pytest.mark.slow
def test_deploy_local_insecure(shell):
    command = shortened("make deploy-local DEPLOY_MODE=insecure", f"{TINY} run-name=readme-deploy-insecure")
    output = ok(shell.run(command.replace("make deploy-local", "make deploy-local DEPLOY_TIERS=rpi4,jetson-orin")))
    assert "fedmoe deploy: insecure, 2 SuperNodes" in output
    record = records(shell.results / "readme-deploy-insecure")[1]
    assert record["num_replies"] == 2 and record["failures"] == 0
    assert sorted(c["tier"] for c in record["clients"].values()) == ["jetson-orin", "rpi4"]
    assert len(list((Path(shell.env["FEDMOE_CACHE_DIR"]) / "tokens").glob("*.npz"))) >= 2  # each node's data tokenised once
    assert not deployment_processes(Path(shell.env["DEPLOY_DIR"]))


@pytest.mark.slow
def test_make_certs(shell, tmp_path):
    ok(shell.run(f"make certs CERTS_DIR={tmp_path}/credentials"))
    files = {p.relative_to(tmp_path / "credentials").as_posix() for p in (tmp_path / "credentials").rglob("*") if p.is_file()}
    assert {"ca.crt", "server.pem", "server.key"} <= files, files
    assert len([f for f in files if f.endswith(".pub")]) == 3, files  # NODES=3 key pairs


@pytest.mark.slow
def test_benchmarks(shell):
    for target, suite in (("bench-quick", "quick"), ("bench-skew", "skew"), ("bench", "full")):
        ok(shell.run(f'make {target} BENCH_ARGS="--smoke --strategies head_only"'))
        results = json.loads((shell.results / "bench" / f"{suite}-smoke.json").read_text())
        assert results["suite"] == f"{suite}-smoke" and results["cells"][0]["strategy"] == "head_only"
        assert (shell.results / "bench" / f"{suite}-smoke.md").is_file()
    ok(shell.run('make bench-budgets BENCH_ARGS="--smoke --methods ub_smoe --partitions dir0.1 --sections learning"'))
    budgets = json.loads((shell.results / "budgets" / "budgets.json").read_text())
    assert [(r["method"], r["partition"]) for r in budgets["runs"]] == [("ub_smoe", "dir0.1")]
    assert budgets["runs"][0]["utilisation"]["all"]["cv"] >= 0 and (shell.results / "budgets" / "budgets.md").is_file()
    ok(shell.run('make bench-remedies BENCH_ARGS="--smoke --strategies head_only --variants none,la"'))
    remedies = json.loads((shell.results / "remedies" / "remedies-smoke.json").read_text())
    assert [(r["strategy"], r["variant"]) for r in remedies["runs"]] == [("head_only", "none"), ("head_only", "la")]
    config = (Path(remedies["runs"][1]["run_dir"]) / "config.yaml").read_text()
    assert "logit-adjustment: 1.0" in config and (shell.results / "remedies" / "remedies-smoke.md").is_file()
    smoke_runs = shell.results / "bench" / "full-smoke-runs"  # make bench's smoke runs, above
    output = ok(shell.run(f'make bench-headline BENCH_ARGS="--runs {smoke_runs} --strategies head_only"'))
    assert "| head_only |" in output and "### Label mix per client" in output
    ok(shell.run(f'make bench-calibration BENCH_ARGS="--runs {smoke_runs} --strategies head_only"'))
    calibrated = json.loads((shell.results / "calibration" / "calibration.json").read_text())["runs"]
    assert [r["run"] for r in calibrated] == ["head_only-dir0.1-mixed-s0"] and 0 <= calibrated[0]["calibrated_accuracy"] <= 1


def test_reading_the_run_records():
    """The README's command reads the run records docs/runs keeps as an archive, as they are:
    the headline cell's 5 seeds of each strategy, docs/RESULTS.md's figures of 2026-12-06."""
    command = next(c for c in RUN_BY if RUN_BY[c] == "test_reading_the_run_records")
    output = ok(subprocess.run(["bash", "-c", command], cwd=APP_DIR, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, timeout=TIMEOUT_S))
    assert "| ub_smoe | 5 | 74.9 ± 8.6 | 88.0 ± 6.5 | 56.0 ± 29.1 |" in output, output
    assert "| fft_moe | 5 | 63.5 ± 13.1 |" in output and "| flexlora | 5 | 82.1 ± 5.4 |" in output
    assert "- ub_smoe - flexlora: global -7.2 (-15.4 .. +1.0;" in output


@pytest.mark.slow
def test_flwr_ls_and_log(shell):
    listed = json.loads(ok(shell.run("flwr ls --format json")))
    finished = [r for r in listed["runs"] if r["status"] == "finished:completed"]
    assert finished, listed
    log = ok(shell.run(f"flwr log {finished[0]['run-id']} --show"))
    assert "fedmoe" in log


@pytest.mark.slow
def test_make_stop(shell):
    def superlinks():
        home = str(shell.simulation.flwr_home)
        return [p for p in psutil.process_iter(["cmdline"])
                if "flower-superlink" in " ".join(p.info["cmdline"] or []) and home in " ".join(p.info["cmdline"] or [])]

    assert superlinks()
    assert "local SuperLink stopped" in ok(shell.run("make stop"))
    psutil.wait_procs(superlinks(), timeout=30)
    assert not superlinks()
