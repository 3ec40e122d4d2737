"""The names of everything a fedmoe message carries, spelled once.

A train or evaluate message holds ARRAYS (tensors) and CONFIG (RUN_CONFIG, SERVER_ROUND and
whatever the method adds), and under train.drift-correction: scaffold a train message may hold
CORRECTION; a train reply holds ARRAYS (updates), METRICS, REQUEST (what the node asks of the
server for the next round) and, under scaffold, GRADIENTS. A method's own entries are spelled in its client
half (fedmoe_app/methods/<name>.py), which its strategy imports. A query reply holds NODE and BUDGET. A CALIBRATE
message holds the global ARRAYS and CONFIG; its reply holds ARRAYS (the FEATURE_* moments).
"""

# Message type of head calibration (calibration.method: ccvr), a Flower evaluate action.
CALIBRATE = "evaluate.calibrate"

# Records of a message's content.
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
REQUEST = "request"
NODE = "node"
BUDGET = "budget"
CORRECTION = "correction"  # train, SCAFFOLD: c - c_i for tensors of ARRAYS the node has a c_i for
GRADIENTS = "gradients"  # train reply, SCAFFOLD: the mean gradient of each tensor in ARRAYS (its next c_i)

# Entries of CONFIG sent down.
RUN_CONFIG = "run-config"  # the resolved run configuration, YAML text
SERVER_ROUND = "server-round"
LR = "lr"  # train: this round's local learning rate (train.lr-schedule)
PROXIMAL_MU = "proximal-mu"  # train: FedProx's mu (Flower's FedProx sends the same key)

# Entries of NODE in a query reply.
CLIENT_ID = "client-id"  # stable across restarts of the node, unlike Flower's node id
NUM_EXAMPLES = "num-examples"  # local training rows (Flower's convention); also a train/evaluate metric

# Train reply METRICS every method reports.
SAMPLES_PROCESSED = "samples-processed"  # batch x local steps
STEPS = "steps"
TRAIN_LOSS = "train-loss"
STEP_SECONDS = "step-seconds"
TRAIN_SECONDS = "train-seconds"
PEAK_RSS_MB = "peak-rss-mb"
BYTES_DOWN = "bytes-down"
BYTES_UP = "bytes-up"
PROXIMAL_TERM = "proximal-term"  # with proximal-mu > 0: mean over the steps of (mu / 2) ||w - w_global||^2

# Evaluate reply METRICS.
ACCURACY = "accuracy"
LOSS = "loss"
RECALL = "recall"  # server-side evaluation: per-class recall, one per class of the head (NaN: no test row of it)


# node_config keys (set per SuperNode, or per simulated node by Flower).
PARTITION_ID = "partition-id"  # simulation: which partition of the dataset
NUM_PARTITIONS = "num-partitions"
DATA_PATH = "data-path"  # a device: its data folder
DEVICE_TIER = "device-tier"  # a device: its tier in the devices file
NODE_CLIENT_ID = "client-id"  # optional: the node's stable client id


# Head calibration reply ARRAYS: per class the training rows [C], the head-input feature mean
# [C, D] and unbiased covariance [C, D, D] under the global model (fedmoe_app.calibration).
FEATURE_COUNT = "feature-count"
FEATURE_MEAN = "feature-mean"
FEATURE_COV = "feature-cov"
