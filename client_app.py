"""fedmoe ClientApp: local MoE / LoRA fine-tuning under the node's compute budget."""

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedmoe_app.config import config_from_yaml
from fedmoe_app.node import query_answer
from fedmoe_app.node_worker import handle

# On a SuperNode every message runs in a new process. A query needs neither torch nor the
# model; train and evaluate run in the node worker, which keeps them loaded
# (fedmoe_app/node_worker.py), or here in simulation.

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server this node's tier, budget and data size."""
    answer = query_answer(config_from_yaml(msg.content["config"]["run-config"]), context.node_config)
    return Message(RecordDict({"node": ConfigRecord(answer)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received tensors on local data; reply with the updates of what was trained."""
    return Message(handle("train", msg.content, context.node_config), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the personalised model on this node's held-out slice."""
    return Message(handle("evaluate", msg.content, context.node_config), reply_to=msg)
