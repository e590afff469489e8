#!/usr/bin/env bash
# Check the real trainer end to end on a GPU machine.
#
# Starts our server pointed at a gaussian-splatting-lightning checkout (its requirements already
# installed as its README describes), uploads a video with a few hundred iterations, follows
# /status to the end and prints the step rate, the final .ply size and the Gaussian count.
# Exits non-zero when anything fails.
#
# usage: scripts/gpu_check.sh /path/to/gaussian-splatting-lightning [video]
#
# environment:
#   VIDEO           the video (default: tests/data/tum_office_orbit.mp4)
#   ITERATIONS      training steps (default 300)
#   PORT            server port (default: a free one)
#   SERVER_PYTHON   interpreter for our server (default python3)
#   TRAINER_PYTHON  interpreter with the trainer's requirements, passed to the server as
#                   TRAINING_SERVER_TRAINER_PYTHON (default: the server's own)
#   TIMEOUT_S       give up after this many seconds (default 3600)
#   KEEP_WORK=1     keep the temporary folder (workspace, logs, database)
set -euo pipefail

die() {
    echo "gpu_check: $*" >&2
    exit 1
}

[[ $# -ge 1 ]] || die "usage: $0 /path/to/gaussian-splatting-lightning [video]"
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CHECKOUT=$(cd "$1" 2>/dev/null && pwd) || die "no such folder: $1"
[[ -f $CHECKOUT/main.py ]] || die "$CHECKOUT has no main.py: not a gaussian-splatting-lightning checkout"
VIDEO=${2:-${VIDEO:-$REPO/tests/data/tum_office_orbit.mp4}}
[[ -f $VIDEO ]] || die "no video at $VIDEO"
ITERATIONS=${ITERATIONS:-300}
SERVER_PYTHON=${SERVER_PYTHON:-python3}
TIMEOUT_S=${TIMEOUT_S:-3600}
command -v curl >/dev/null || die "curl is needed"
command -v python3 >/dev/null || die "python3 is needed"
PORT=${PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
BASE=http://127.0.0.1:$PORT
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
SERVER_PID=

cleanup() {
    if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$SERVER_PID" 2>/dev/null || true
    fi
    if [[ ${KEEP_WORK:-0} == 1 ]]; then
        echo "gpu_check: kept $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT

# json EXPR: evaluate a Python expression over the JSON document on stdin (`d`); `find(key)`
# returns the first value stored under that key anywhere in it.
json() {
    python3 -c '
import json, sys
d = json.load(sys.stdin)
def find(key, node=d):
    if isinstance(node, dict):
        if key in node:
            return node[key]
        node = list(node.values())
    if isinstance(node, list):
        for item in node:
            found = find(key, item)
            if found is not None:
                return found
    return None
value = eval(sys.argv[1])
print("" if value is None else value)
' "$1"
}

echo "gpu_check: trainer checkout $CHECKOUT"
echo "gpu_check: video $VIDEO, $ITERATIONS iterations, server on port $PORT, work folder $WORK"
export TRAINING_SERVER_TRAINER_PATH=$CHECKOUT
export TRAINING_SERVER_TEMP_DIR=$WORK/temp_workspace
export TRAINING_SERVER_LOGS_DIR=$WORK/logs
export TRAINING_SERVER_DB_PATH=$WORK/training_server.db
if [[ -n ${TRAINER_PYTHON:-} ]]; then
    export TRAINING_SERVER_TRAINER_PYTHON=$TRAINER_PYTHON
fi
(cd "$REPO" && exec "$SERVER_PYTHON" training_server.py --host 127.0.0.1 --port "$PORT") \
    >"$WORK/server.log" 2>&1 &
SERVER_PID=$!

for _ in $(seq 120); do
    if HEALTH=$(curl -fsS "$BASE/health" 2>/dev/null); then
        break
    fi
    kill -0 "$SERVER_PID" 2>/dev/null || { tail -n 40 "$WORK/server.log" >&2; die "the server exited"; }
    sleep 0.5
done
[[ -n ${HEALTH:-} ]] || { tail -n 40 "$WORK/server.log" >&2; die "the server did not answer /health"; }
echo "gpu_check: /health $HEALTH"

UPLOAD=$(curl -fsS -F "file=@$VIDEO" "$BASE/upload?iterations=$ITERATIONS") || die "upload failed"
TASK=$(printf '%s' "$UPLOAD" | json 'd["task_id"]')
[[ -n $TASK ]] || die "no task_id in $UPLOAD"
echo "gpu_check: task $TASK"

START=$SECONDS
TRAIN_START=
TRAIN_END=
RATE=
LAST=
STATUS=
while :; do
    if ((SECONDS - START > TIMEOUT_S)); then
        die "no result after $TIMEOUT_S s (status ${STATUS:-unknown})"
    fi
    if ! BODY=$(curl -fsS "$BASE/status/$TASK" 2>/dev/null); then
        kill -0 "$SERVER_PID" 2>/dev/null || { tail -n 40 "$WORK/server.log" >&2; die "the server exited"; }
        sleep 2
        continue
    fi
    STATUS=$(printf '%s' "$BODY" | json 'd["status"]')
    LINE=$(printf '%s' "$BODY" | json '"  ".join(f"{k}={v}" for k, v in [("status", d.get("status")), *((d.get("progress") or {}).items()), ("message", d.get("message"))] if v is not None)')
    if [[ $LINE != "$LAST" ]]; then
        printf '%6ds  %s\n' $((SECONDS - START)) "$LINE"
        LAST=$LINE
    fi
    if [[ $STATUS == training ]]; then
        TRAIN_START=${TRAIN_START:-$SECONDS}
        STAGE_RATE=$(printf '%s' "$BODY" | json '(d.get("progress") or {}).get("rate") if (d.get("progress") or {}).get("stage") == "training" else None')
        RATE=${STAGE_RATE:-$RATE}
    fi
    case $STATUS in
        training_completed) TRAIN_END=$SECONDS; break ;;
        failed | cancelled)
            echo "gpu_check: task $STATUS: $(printf '%s' "$BODY" | json 'd.get("error_message") or d.get("message")')" >&2
            curl -fsS "$BASE/logs/$TASK" 2>/dev/null | tail -n 40 >&2 || true
            tail -n 20 "$WORK/server.log" >&2
            exit 1
            ;;
    esac
    sleep 2
done

PLY_SIZE=$(printf '%s' "$BODY" | json 'find("ply_size_bytes")')
GAUSSIANS=$(printf '%s' "$BODY" | json 'find("gaussian_count")')
DONE_STEPS=$(printf '%s' "$BODY" | json 'find("iterations")')
PLY_PATH=$(printf '%s' "$BODY" | json 'find("ply_path")')
[[ -n $PLY_SIZE && -n $GAUSSIANS ]] || die "metadata has no ply_size_bytes/gaussian_count: $BODY"

curl -fsS -o "$WORK/result.ply" "$BASE/download/$TASK/ply" || die "GET /download/$TASK/ply failed"
HEADER_COUNT=$(python3 -c '
import sys
head = open(sys.argv[1], "rb").read(65536)
assert head.startswith(b"ply"), "not a PLY file"
for line in head[: head.index(b"end_header")].decode("ascii", "replace").splitlines():
    if line.startswith("element vertex "):
        print(int(line.split()[2]))
' "$WORK/result.ply") || die "the downloaded .ply is not a PLY file"
DOWNLOADED=$(wc -c <"$WORK/result.ply" | tr -d ' ')
[[ $DOWNLOADED == "$PLY_SIZE" ]] || die "downloaded .ply has $DOWNLOADED bytes, metadata says $PLY_SIZE"
[[ $HEADER_COUNT == "$GAUSSIANS" ]] || die ".ply header has $HEADER_COUNT vertices, metadata says $GAUSSIANS"

echo
echo "gpu_check: training_completed in $((SECONDS - START)) s (training stage $((TRAIN_END - ${TRAIN_START:-TRAIN_END})) s)"
echo "gpu_check: step rate (trainer's last report): ${RATE:-unknown} it/s"
echo "gpu_check: iterations run: ${DONE_STEPS:-unknown}"
echo "gpu_check: final .ply: ${PLY_PATH:-?} ($PLY_SIZE bytes)"
echo "gpu_check: Gaussians: $GAUSSIANS"
