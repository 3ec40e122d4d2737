"""fedmoe ClientApp: local MoE / LoRA fine-tuning under the node's compute budget."""

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmoe_app.config import config_from_yaml
from fedmoe_app.node import query_answer

# On a SuperNode every message runs in a new process: train and evaluate import torch and
# the model code themselves, so a query pays for neither.

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server this node's tier, budget and data size."""
    answer = query_answer(config_from_yaml(msg.content["config"]["run-config"]), context.node_config)
    return Message(RecordDict({"node": ConfigRecord(answer)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received tensors on local data; reply with the updates of only what was
    trained (trained minus received), in the run's wire dtype."""
    from fedmoe_app.client import client_task
    from fedmoe_app.records import from_record, record_nbytes, to_record, updates_from

    config = msg.content["config"]
    task = client_task(config["run-config"], context.node_config)
    received = from_record(msg.content["arrays"])
    arrays, metrics, next_experts = task.train(
        received, config["adapter"], config["server-round"], config.get("global-usage")
    )
    reply_arrays = to_record(updates_from(arrays, received), task.config.federation.wire_dtype)
    metrics["bytes-down"] = record_nbytes(msg.content["arrays"])
    metrics["bytes-up"] = record_nbytes(reply_arrays)
    content = RecordDict({
        "arrays": reply_arrays,
        "metrics": MetricRecord(metrics),
        "request": ConfigRecord({"next-experts": next_experts, "device-tier": task.budget.tier}),
    })
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the personalised model on this node's held-out slice."""
    from fedmoe_app.client import client_task
    from fedmoe_app.records import from_record

    config = msg.content["config"]
    task = client_task(config["run-config"], context.node_config)
    metrics = task.evaluate(from_record(msg.content["arrays"]), config["adapter"])
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
