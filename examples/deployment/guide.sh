#!/usr/bin/env bash
# A federation by hand, on one machine: a SuperLink with TLS and SuperNode authentication, two
# SuperNodes, a SuperNode with an unregistered key refused, one run of the fedcsg app and its
# results, the run's status from `flwr ls`, the exported model and a prediction with it on a device.
# Run it from the fedcsg checkout (`flwr run .` builds the app bundle from `.`):
#     FEDCSG_DATA_DIR=/data bash examples/deployment/guide.sh
# The settings below come from the environment. On several machines each step runs where its
# header says ([server], [operator]: flwr, [device]); HOST is then the SuperLink's name (it goes into
# its certificate). The script stops the processes it started when it ends, pass or fail.
# docs/deployment.md shows this file verbatim.
set -euo pipefail

DATA=${FEDCSG_DATA_DIR:-}           # the data directory (cifar10/*.parquet), on the server and on each device
WORK=${WORK:-$PWD/fedcsg-guide}     # certificates, keys, logs, the SuperLink's database and results
HOST=${HOST:-127.0.0.1}             # where SuperNodes and flwr reach the SuperLink
LISTEN=${LISTEN:-0.0.0.0}           # where the SuperLink listens
PORT=${PORT:-9093}                  # the SuperLink's one port: Fleet, Control and Runtime APIs
NODE_PORTS=(${NODE_PORTS:-9094 9095 9096})  # each SuperNode's own Runtime API: one port each on one host
ROUNDS=${ROUNDS:-3}
RUN_CONFIG=${RUN_CONFIG:-}          # more run settings, e.g. "arm='csg-frozen' train-limit=2000"
PER_CLASS=${PER_CLASS:-20}          # test images of each class the device predicts
NAME=${NAME:-edge}                  # flwr's connection name
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1  # fedcsg is installed: no `uv sync` per run

[ -d "$DATA" ] || { echo "FEDCSG_DATA_DIR '$DATA' is not a directory: set it to the data directory" >&2; exit 2; }
grep -q '^name = "fedcsg"' pyproject.toml 2> /dev/null || { echo "run this from the fedcsg checkout" >&2; exit 2; }
[ ! -e "$WORK" ] || { echo "$WORK exists: remove it or set WORK" >&2; exit 2; }
mkdir -p "$WORK/logs" && WORK=$(cd "$WORK" && pwd)
export FLWR_HOME=$WORK/flwr-home    # flwr's config.toml (default ~/.flwr, left alone here)
STARTED=()
stop() {  # the processes started here and their children (each one's SuperExec), by PID
    local pids=("${STARTED[@]}") pid
    for pid in "${STARTED[@]}"; do pids+=($(pgrep -P "$pid")) || true; done
    kill "${pids[@]}" 2> /dev/null || true
    wait
}
trap stop EXIT
step() { echo "== [$SECONDS s] $*"; }
retry() {  # retry SECONDS WHAT COMMAND...: run COMMAND every second until it succeeds
    local until=$((SECONDS + $1)) what=$2
    shift 2
    until "$@" > /dev/null 2>&1; do
        [ "$SECONDS" -lt "$until" ] || { echo "guide: $what: not within the time allowed" >&2; exit 1; }
        sleep 1
    done
}
online() { [ "$(flwr supernode ls "$NAME" --format json | grep -o '"status": "online"' | wc -l)" -ge "$1" ]; }

step "1. [server] Credentials: a CA and the SuperLink's certificate; [device] a key pair each (0600)"
fedcsg deploy certs --out "$WORK/certs" --host "$HOST" --host 127.0.0.1 --host localhost  # its ServerApps: 127.0.0.1
fedcsg deploy keys --out "$WORK/keys" --nodes 3  # on a device: ssh-keygen -t ecdsa -b 384 -N "" -f node.key

step "2. [server] SuperLink: TLS, registered SuperNodes only; its ServerApp evaluates on FEDCSG_DATA_DIR"
(cd "$WORK" && FEDCSG_DATA_DIR=$DATA exec flower-superlink --host "$LISTEN" --port "$PORT" \
    --ssl-ca-certfile certs/ca.crt --ssl-certfile certs/server.crt --ssl-keyfile certs/server.key \
    --enable-supernode-auth --database state.db > logs/superlink.log 2>&1) &
STARTED+=($!)

step "3. [operator] flwr's connection entry (the CA certificate is public), then wait for the SuperLink"
mkdir -p "$FLWR_HOME"
printf '[superlink.%s]\naddress = "%s:%s"\nroot-certificates = "%s"\n' "$NAME" "$HOST" "$PORT" \
    "$WORK/certs/ca.crt" > "$FLWR_HOME/config.toml"
retry 60 "the SuperLink answers" flwr ls "$NAME"

step "4. [operator] Register each SuperNode's public key (the SuperLink assigns its node id)"
flwr supernode register "$WORK/keys/node-0.key.pub" "$NAME"
flwr supernode register "$WORK/keys/node-1.key.pub" "$NAME"

step "5. [device] Two SuperNodes, each with its partition and, on one host, its own --port"
for i in 0 1; do
    flower-supernode --superlink "$HOST:$PORT" --root-certificates "$WORK/certs/ca.crt" \
        --auth-supernode-private-key "$WORK/keys/node-$i.key" --port "${NODE_PORTS[$i]}" \
        --node-config "partition-id=$i num-partitions=2 data-dir=\"$DATA\"" > "$WORK/logs/supernode-$i.log" 2>&1 &
    STARTED+=($!)
done
retry 120 "2 SuperNodes online" online 2 && echo "2 SuperNodes online"

step "6. [device] A SuperNode whose key was never registered (node-2's) is refused, and exits 1"
code=0
timeout 120 flower-supernode --superlink "$HOST:$PORT" --root-certificates "$WORK/certs/ca.crt" \
    --auth-supernode-private-key "$WORK/keys/node-2.key" --port "${NODE_PORTS[2]}" \
    > "$WORK/logs/unregistered.log" 2>&1 || code=$?
grep -F -e "Exit Code: 305" -e "[code: 2004] Failed to activate SuperNode." "$WORK/logs/unregistered.log"
grep -o "\[ApiError:2004\].*No SuperNode found with the given public key." "$WORK/logs/superlink.log" |
    sed 's/key: b.*exception/key: ..., exception/'
echo "the unregistered SuperNode exited $code"
[ "$code" = 1 ]

step "7. [operator] Run the app: \`.\` is the fedcsg checkout"
flwr run . "$NAME" --stream --run-config "num-clients=2 num-rounds=$ROUNDS $RUN_CONFIG" 2>&1 | tee "$WORK/logs/run.log"
RUN_ID=$(sed -n 's/.*Successfully started run \([0-9]*\).*/\1/p' "$WORK/logs/run.log")

step "8. [operator] Did it complete? \`flwr run --stream\` exits 0 even when the run failed: \`flwr ls\` tells"
STATUS=$(flwr ls "$NAME" --run-id "$RUN_ID" --format json | python3 -c 'import json, sys
print(json.load(sys.stdin)["runs"][0]["status"])')
echo "run $RUN_ID: $STATUS"
[ "$STATUS" = "finished:completed" ] || { echo "see $WORK/logs/superlink.log" >&2; exit 1; }

step "9. [server] Results: runs/flwr-RUN_ID under the directory the SuperLink was started in"
RESULTS=$WORK/runs/flwr-$RUN_ID
ls "$RESULTS"
grep -A6 "## What one node downloads" "$RESULTS/report.md" | tail -3  # the app bundle, counted once

step "10. [server] The model for devices: a compact file (a frozen generator travels as its seed)"
fedcsg export --checkpoint "$RESULTS" --format compact --out "$WORK/model.compact.safetensors"

step "11. [device] Predict with torch, safetensors and fedcsg's model code (no Flower), on labelled images"
python3 - "$WORK/model.compact.safetensors" "$PER_CLASS" << 'EOF'
import sys

import numpy as np

from fedcsg.data.readers import load_labels, load_split
from fedcsg.deploy.on_device import load_compact, predict

model, info, metadata = load_compact(sys.argv[1])
per_class = int(sys.argv[2])
labels = load_labels(info.dataset, "test")  # the test split in $FEDCSG_DATA_DIR
rows = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(info.num_classes)])
test = load_split(info.dataset, "test", indices=rows)
predicted = predict(model, test.images, metadata)
accuracy = (predicted == test.labels).double().mean().item()
print(f"on-device: {info.model} ({info.arm}), {len(rows)} test images, the first {per_class} of each class: "
      f"accuracy {accuracy:.4f}")
EOF
step "done"
