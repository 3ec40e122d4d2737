"""A Flower Grid whose nodes are answered in this process by the ClientApp's own handlers:
the tests' and the in-process benchmarks' stand-in for a federation."""

from __future__ import annotations


class InProcessGrid:
    """A Flower Grid whose nodes run in this process: every message is answered by the
    ClientApp's own handlers (query, train, evaluate), node i with the node_config of
    simulated partition i, each in a thread; a handler that raises gets an error reply, one
    that takes longer than the timeout gets none (as with Flower's grid)."""

    def __init__(self, num_nodes: int) -> None:
        self.node_configs = {101 + i: {"partition-id": i, "num-partitions": num_nodes} for i in range(num_nodes)}
        self.sent = 0

    def get_node_ids(self) -> list[int]:
        return list(self.node_configs)

    def answer(self, message):
        from flwr.app import ConfigRecord, MessageType, RecordDict

        from fedmoe_app import messages as msg
        from fedmoe_app.config import config_from_yaml
        from fedmoe_app.handlers import HANDLERS
        from fedmoe_app.node import query_answer

        node_config = self.node_configs[message.metadata.dst_node_id]
        if message.metadata.message_type == MessageType.QUERY:
            answer = query_answer(config_from_yaml(message.content[msg.CONFIG][msg.RUN_CONFIG]), node_config)
            return RecordDict({name: ConfigRecord(record) for name, record in answer.items()})
        return HANDLERS[message.metadata.message_type](message.content, node_config)

    def send_and_receive(self, messages, *, timeout=None):
        from concurrent.futures import ThreadPoolExecutor, wait

        from flwr.app import Message
        from flwr.common import Error

        messages = list(messages)
        for message in messages:
            self.sent += 1
            message.metadata.__dict__["_message_id"] = f"m{self.sent}"
        pool = ThreadPoolExecutor(max_workers=max(1, len(messages)))
        futures = {pool.submit(self.answer, m): m for m in messages}
        done, _ = wait(futures, timeout=timeout)
        pool.shutdown(wait=False)  # a hung handler is left behind, as a dead node would be
        replies = []
        for future in (f for f in futures if f in done):
            message = futures[future]
            if future.exception() is not None:
                error = future.exception()
                replies.append(Message(Error(code=0, reason=f"{type(error).__name__}: {error}"), reply_to=message))
            else:
                replies.append(Message(future.result(), reply_to=message))
        return replies
