"""fedmoe ClientApp: local MoE / LoRA fine-tuning under the node's compute budget."""

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp

from fedmoe_app import messages as msg
from fedmoe_app.config import config_from_yaml
from fedmoe_app.node import query_answer
from fedmoe_app.node_worker import handle

# On a SuperNode every message runs in a new process. A query needs neither torch nor the
# model; train and evaluate run in the node worker, which keeps them loaded
# (fedmoe_app/node_worker.py), or here in simulation.

app = ClientApp()


@app.query()
def query(message: Message, context: Context) -> Message:
    """Tell the server this node's client id, budget and data size."""
    answer = query_answer(config_from_yaml(message.content[msg.CONFIG][msg.RUN_CONFIG]), context.node_config)
    return Message(RecordDict({name: ConfigRecord(record) for name, record in answer.items()}), reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    """Train the received tensors on local data; reply with the updates of what was trained."""
    return Message(handle(MessageType.TRAIN, message.content, context.node_config), reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Evaluate the personalised model on this node's held-out slice."""
    return Message(handle(MessageType.EVALUATE, message.content, context.node_config), reply_to=message)


@app.evaluate("calibrate")
def calibrate(message: Message, context: Context) -> Message:
    """Report the per-class moments of the global model's features on local training rows."""
    return Message(handle(msg.CALIBRATE, message.content, context.node_config), reply_to=message)
