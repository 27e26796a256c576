"""The message schema both sides spell: the record names of a train message and its reply, and the
keys of a reply's metrics.

A train message carries ``{ARRAYS: payload, CONFIG: settings}``; a client's reply carries
``{ARRAYS: update, METRICS: metrics}`` (and, in fedcsg.fl.ray_cluster, its placement). The
aggregation weight of a reply is its ``NUM_EXAMPLES`` metric, as Flower's FedAvg reads it
(``weighted_by_key``). ``PARTITION_ID`` is also the node-config key under which Flower's simulation
engine gives each virtual client its partition.
"""

from __future__ import annotations

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"

NUM_EXAMPLES = "num-examples"  # the aggregation weight (FedAvg's weighted_by_key)
WEIGHT_KEY = NUM_EXAMPLES
TRAIN_LOSS = "train-loss"
TRAIN_ACCURACY = "train-accuracy"
TRAIN_SECONDS = "train-seconds"
PARTITION_ID = "partition-id"
TEST_ACCURACY = "test-accuracy"  # the server-side evaluation of a round (its evaluate_fn's metrics)
TEST_LOSS = "test-loss"
TRAIN_METRICS = (TRAIN_LOSS, TRAIN_ACCURACY, TRAIN_SECONDS)  # averaged over the replies of a round
