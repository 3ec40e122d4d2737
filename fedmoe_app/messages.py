"""The names of everything a fedmoe message carries, spelled once.

A train or evaluate message holds ARRAYS (tensors) and CONFIG (RUN_CONFIG, SERVER_ROUND and
whatever the method adds); a train reply holds ARRAYS (updates), METRICS and REQUEST (what the
node asks of the server for the next round). A query reply holds NODE and BUDGET.
"""

# Records of a message's content.
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
REQUEST = "request"
NODE = "node"
BUDGET = "budget"

# Entries of CONFIG sent down.
RUN_CONFIG = "run-config"  # the resolved run configuration, YAML text
SERVER_ROUND = "server-round"

# Entries of NODE in a query reply.
CLIENT_ID = "client-id"  # stable across restarts of the node, unlike Flower's node id
NUM_EXAMPLES = "num-examples"  # local training rows (Flower's convention); also a train/evaluate metric

# Train reply METRICS every method reports.
SAMPLES_PROCESSED = "samples-processed"  # batch x local steps
STEPS = "steps"
TRAIN_LOSS = "train-loss"
STEP_SECONDS = "step-seconds"
TRAIN_SECONDS = "train-seconds"
BATCH_SIZE = "batch-size"
MAX_LENGTH = "max-length"
PEAK_RSS_MB = "peak-rss-mb"
BYTES_DOWN = "bytes-down"
BYTES_UP = "bytes-up"

# Evaluate reply METRICS.
ACCURACY = "accuracy"
LOSS = "loss"

# Routing statistics an MoE method reports (fedmoe_app.routing), flattened [L * M].
ROUTED_TOKENS = "routed-tokens"
GATE_PROB = "gate-prob"

# FFT-MoE: the global expert usage sent down [L * M]; the experts a node asks to hold next round [L * held].
GLOBAL_USAGE = "global-usage"
NEXT_EXPERTS = "next-experts"
