#!/usr/bin/env bash
# Check the real trainer end to end on a GPU machine, in one prepared run of at most 8 minutes.
#
#  1. Builds the trainer's CUDA extensions when its Python cannot import them (from local
#     source folders: the GPU machine may have no internet access) and checks that the LPIPS
#     backbone's weights are in the torch hub cache (the trainer cannot start without them).
#  2. Starts our server on the checkout, prints /health (CUDA probe + dry run of the command).
#  3. Uploads the office video with preset=fast (7,000 steps) and hold-out (every 8th frame),
#     SIGKILLs the server at ~60 % of the training, restarts it and follows the task to the end
#     (it must resume from the snapshot at step 4,000 and say so).
#  4. Runs the trainer's main.py directly with the server's exact flags (from the task log) on
#     the same dataset, as the baseline.
#  5. Prints a table: steps/s server vs direct, PSNR/SSIM/LPIPS on held-out frames, .ply size
#     and Gaussian count, "resumed from step S", wall times.
# Exits non-zero when anything fails or the time runs out.
#
# usage: scripts/gpu_check.sh /path/to/gaussian-splatting-lightning [video]
#
# environment:
#   VIDEO           the video (default: tests/data/tum_office_orbit.mp4)
#   PRESET          fast (default) or full
#   KILL_AT         fraction of the run at which the server is SIGKILLed (default 0.6)
#   SERVER_PYTHON   interpreter for our server (default: .venv/bin/python, else python3)
#   TRAINER_PYTHON  interpreter with the trainer's requirements (default: the server's)
#   EXTENSIONS_DIR  folder holding the sources of diff-gaussian-rasterization and simple-knn,
#                   built with pip when the trainer's Python cannot import them
#                   (default: $CHECKOUT/../extensions)
#   LPIPS_WEIGHTS   alexnet-owt-7be5be79.pth to copy into the torch hub cache when missing
#   DEADLINE_S      give up after this many seconds in all (default 470)
#   PORT            server port (default: a free one)
#   KEEP_WORK=1     keep the temporary folder (workspace, logs, database, direct run)
set -euo pipefail

T0=$SECONDS
die() {
    echo "gpu_check: FAILED after $((SECONDS - T0)) s: $*" >&2
    exit 1
}
say() { echo "gpu_check [$((SECONDS - T0))s]: $*"; }

[[ $# -ge 1 ]] || die "usage: $0 /path/to/gaussian-splatting-lightning [video]"
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CHECKOUT=$(cd "$1" 2>/dev/null && pwd) || die "no such folder: $1"
[[ -f $CHECKOUT/main.py ]] || die "$CHECKOUT has no main.py: not a gaussian-splatting-lightning checkout"
VIDEO=${2:-${VIDEO:-$REPO/tests/data/tum_office_orbit.mp4}}
[[ -f $VIDEO ]] || die "no video at $VIDEO"
PRESET=${PRESET:-fast}
KILL_AT=${KILL_AT:-0.6}
DEADLINE_S=${DEADLINE_S:-470}
if [[ -z ${SERVER_PYTHON:-} ]]; then
    SERVER_PYTHON=python3
    [[ -x $REPO/.venv/bin/python ]] && SERVER_PYTHON=$REPO/.venv/bin/python
fi
TRAINER_PYTHON=${TRAINER_PYTHON:-$SERVER_PYTHON}
EXTENSIONS_DIR=${EXTENSIONS_DIR:-$CHECKOUT/../extensions}
command -v curl >/dev/null || die "curl is needed"
PORT=${PORT:-$("$SERVER_PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
BASE=http://127.0.0.1:$PORT
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
SERVER_PID=
DIRECT_PID=

stop_server() {
    if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=
}
cleanup() {
    stop_server
    if [[ -n $DIRECT_PID ]]; then kill -- -"$DIRECT_PID" 2>/dev/null || true; fi
    if [[ ${KEEP_WORK:-0} == 1 ]]; then echo "gpu_check: kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
left() { echo $((DEADLINE_S - (SECONDS - T0))); }
check_time() { (($(left) > 0)) || die "out of time (${DEADLINE_S} s) while $1"; }

# json EXPR: a Python expression over the JSON document on stdin (`d`).
json() { "$SERVER_PYTHON" -c 'import json, sys; d = json.load(sys.stdin); v = eval(sys.argv[1]); print("" if v is None else v)' "$1"; }

# -- 1. extensions and LPIPS weights ------------------------------------------------------
say "trainer checkout $CHECKOUT, trainer python $TRAINER_PYTHON, work folder $WORK"
ARCH=$("$TRAINER_PYTHON" -c 'import torch; c = torch.cuda.get_device_capability(0); print(f"{c[0]}.{c[1]}")') \
    || die "the trainer's Python has no torch with a CUDA device"
for pair in diff_gaussian_rasterization:diff-gaussian-rasterization simple_knn:simple-knn; do
    module=${pair%%:*} folder=${pair#*:}
    if "$TRAINER_PYTHON" -c "import $module" 2>/dev/null; then
        say "extension $module: already built"
        continue
    fi
    [[ -d $EXTENSIONS_DIR/$folder ]] || die "cannot import $module and there is no source at $EXTENSIONS_DIR/$folder"
    say "building $module for compute capability $ARCH ..."
    TORCH_CUDA_ARCH_LIST=$ARCH MAX_JOBS=${MAX_JOBS:-16} timeout "$(left)" \
        "$TRAINER_PYTHON" -m pip install --no-build-isolation --no-deps --no-index \
        "$EXTENSIONS_DIR/$folder" >"$WORK/build-$module.log" 2>&1 \
        || { tail -n 30 "$WORK/build-$module.log" >&2; die "building $module failed"; }
    "$TRAINER_PYTHON" -c "import $module" || die "$module still cannot be imported after its build"
done
HUB=$("$TRAINER_PYTHON" -c 'import torch; print(torch.hub.get_dir())')
ALEX=$HUB/checkpoints/alexnet-owt-7be5be79.pth
if [[ ! -f $ALEX ]]; then
    [[ -n ${LPIPS_WEIGHTS:-} && -f ${LPIPS_WEIGHTS:-} ]] \
        || die "LPIPS weights missing at $ALEX (set LPIPS_WEIGHTS to a copy of alexnet-owt-7be5be79.pth)"
    mkdir -p "$HUB/checkpoints" && cp "$LPIPS_WEIGHTS" "$ALEX"
fi
say "LPIPS weights: $ALEX"

# -- 2. our server ------------------------------------------------------------------------
export TRAINING_SERVER_TRAINER_PATH=$CHECKOUT
export TRAINING_SERVER_TRAINER_PYTHON=$TRAINER_PYTHON
export TRAINING_SERVER_TEMP_DIR=$WORK/temp_workspace
export TRAINING_SERVER_LOGS_DIR=$WORK/logs
export TRAINING_SERVER_DB_PATH=$WORK/training_server.db
export TRAINING_SERVER_KILL_GRACE=5
start_server() {
    (cd "$REPO" && exec "$SERVER_PYTHON" training_server.py --host 127.0.0.1 --port "$PORT") \
        >>"$WORK/server.log" 2>&1 &
    SERVER_PID=$!
    HEALTH=
    for _ in $(seq 240); do
        HEALTH=$(curl -fsS "$BASE/health" 2>/dev/null) && break
        kill -0 "$SERVER_PID" 2>/dev/null || { tail -n 40 "$WORK/server.log" >&2; die "the server exited"; }
        sleep 0.5
    done
    [[ -n $HEALTH ]] || die "the server did not answer /health"
}
start_server
say "/health training: $(printf '%s' "$HEALTH" | json 'd["training"]')"
[[ $(printf '%s' "$HEALTH" | json 'd["training"]["available"]') == True ]] || die "training is not available"

# -- 3. upload, SIGKILL at ~60 %, restart, follow to the end ------------------------------
UP_T=$SECONDS
UPLOAD=$(curl -fsS -F "file=@$VIDEO" -F preset="$PRESET" -F hold_out=true "$BASE/upload") || die "upload failed"
TASK=$(printf '%s' "$UPLOAD" | json 'd["task_id"]')
[[ -n $TASK ]] || die "no task_id in $UPLOAD"
say "task $TASK"

RATES=()
poll() {  # poll WANT_KILL: follow /status; with WANT_KILL=1 return once the kill point is passed
    local last=""
    while :; do
        check_time "following task $TASK"
        BODY=$(curl -fsS "$BASE/status/$TASK" 2>/dev/null) || { sleep 1; continue; }
        STATUS=$(printf '%s' "$BODY" | json 'd["status"]')
        local line
        line=$(printf '%s' "$BODY" | json '"  ".join(f"{k}={v}" for k, v in [("status", d["status"]), *((d.get("progress") or {}).items()), ("message", d.get("message"))] if v is not None and k != "updated_at")')
        [[ $line != "$last" ]] && { printf '%6ds  %s\n' $((SECONDS - T0)) "$line"; last=$line; }
        if [[ $STATUS == training ]]; then
            TRAIN_T=${TRAIN_T:-$SECONDS}
            PREP_S=${PREP_S:-$((SECONDS - UP_T))}
            rate=$(printf '%s' "$BODY" | json '(d.get("progress") or {}).get("rate")')
            [[ -n $rate ]] && RATES+=("$rate")
            if [[ $1 == 1 ]]; then
                done_=$(printf '%s' "$BODY" | json 'int(((d.get("progress") or {}).get("current") or 0) >= '"$KILL_AT"' * ((d.get("progress") or {}).get("total") or 1e9))')
                [[ $done_ == 1 ]] && return 0
            fi
        fi
        case $STATUS in
            training_completed) return 0 ;;
            failed | cancelled)
                echo "task $STATUS: $(printf '%s' "$BODY" | json 'd.get("error_message") or d.get("message")')" >&2
                curl -fsS "$BASE/logs/$TASK" | tail -n 40 >&2 || true
                die "the task ended $STATUS"
                ;;
        esac
        sleep 1
    done
}
TRAIN_T=
PREP_S=
poll 1
[[ $STATUS == training ]] || die "the training ended before the kill point"
KILLED_AT=$(printf '%s' "$BODY" | json 'd["progress"]["current"]')
FIRST_LEG_S=$((SECONDS - TRAIN_T))
say "SIGKILL the server at step $KILLED_AT"
kill -9 "$SERVER_PID"
wait "$SERVER_PID" 2>/dev/null || true
SERVER_PID=
RESTART_T=$SECONDS
start_server
poll 0
SECOND_LEG_S=$((SECONDS - RESTART_T))
LOG=$(curl -fsS "$BASE/logs/$TASK")
RESUMED=$(printf '%s\n' "$LOG" | grep -o 'Training resumed from step [0-9]* of [0-9]*' | tail -n 1)
[[ -n $RESUMED ]] || die "the log does not say the training resumed"
STATUS_MESSAGE=$(printf '%s' "$BODY" | json 'd["message"]')
[[ $STATUS_MESSAGE == *"resumed from step"* ]] || die "/status does not say it resumed: $STATUS_MESSAGE"
S_PLY=$(printf '%s' "$BODY" | json 'd["metadata"]["training"]["ply_size_bytes"]')
S_GAUSS=$(printf '%s' "$BODY" | json 'd["metadata"]["training"]["gaussian_count"]')
S_SIZE=$(printf '%s' "$BODY" | json '"{width}x{height}".format(**d["metadata"]["training"]["image_size"])')
S_Q=$(printf '%s' "$BODY" | json '"PSNR {psnr:.2f} SSIM {ssim:.3f} LPIPS {lpips} on {eval_images} {split}".format(**d["metadata"]["training"]["quality"])')
curl -fsS -o "$WORK/server.ply" "$BASE/download/$TASK/ply" || die "GET /download/$TASK/ply failed"
[[ $(wc -c <"$WORK/server.ply" | tr -d ' ') == "$S_PLY" ]] || die "the downloaded .ply is not the size the metadata says"
S_RATE=$(printf '%s\n' "${RATES[@]:-}" | "$SERVER_PYTHON" -c 'import statistics, sys; v = [float(x) for x in sys.stdin.read().split()]; print(f"{statistics.median(v):.1f}" if v else "?")')
stop_server

# -- 4. the trainer directly, with the server's exact flags --------------------------------
ARGV_FILE=$WORK/direct.argv
printf '%s\n' "$LOG" | grep 'Running: .*main.py fit' | head -n 1 | sed 's/.*Running: //' >"$WORK/server.cmd"
"$SERVER_PYTHON" - "$WORK/server.cmd" "$WORK/direct" >"$ARGV_FILE" <<'EOF'
import shlex, sys
argv = open(sys.argv[1]).read().split()  # the server logs its argv joined by spaces
argv[argv.index("-n") + 1] = "direct"
argv[argv.index("--output") + 1] = sys.argv[2]
if "--ckpt_path" in argv:
    del argv[argv.index("--ckpt_path") : argv.index("--ckpt_path") + 2]
print("\n".join(argv))
EOF
mapfile -t DIRECT <"$ARGV_FILE"
say "direct: ${DIRECT[*]}"
DIRECT_T=$SECONDS
(cd "$CHECKOUT" && PYTHONUNBUFFERED=1 TQDM_MINITERS=10 WANDB_MODE=${WANDB_MODE:-offline} \
    exec setsid -w timeout "$(left)" "${DIRECT[@]}") >"$WORK/direct.out" 2>&1 &
DIRECT_PID=$!
wait "$DIRECT_PID" || { tail -n 40 "$WORK/direct.out" >&2; die "the direct run failed or ran out of time"; }
DIRECT_PID=
DIRECT_S=$((SECONDS - DIRECT_T))
read -r D_RATE D_PLY D_GAUSS D_Q < <(cd "$REPO" && "$SERVER_PYTHON" - "$WORK/direct.out" "$WORK/direct/direct" <<'EOF'
import statistics, sys
from pathlib import Path
import training_server_trainer as t
parser, rates = t.TrainingProgressParser(), []
for chunk in iter(lambda f=open(sys.argv[1], "rb"): f.read(4096), b""):
    if (p := parser.feed(chunk)) is not None and p.rate:
        rates.append(p.rate)
out = Path(sys.argv[2])
res = t.collect_results(out)
q = t.training_quality(out, res["iterations"], parser, hold_out=True)
quality = f"PSNR_{q['psnr']:.2f}_SSIM_{q['ssim']:.3f}_LPIPS_{q['lpips']}" if q else "none"
print(f"{statistics.median(rates):.1f}", res["ply_size_bytes"], res["gaussian_count"], quality)
EOF
) || die "cannot read the direct run's results"

# -- 5. the table -------------------------------------------------------------------------
echo
printf '%-26s %-44s %s\n' "" "server (killed at $KILLED_AT, resumed)" "main.py directly"
printf '%-26s %-44s %s\n' "steps/s (median)" "$S_RATE" "$D_RATE"
printf '%-26s %-44s %s\n' "quality (held-out)" "$S_Q" "${D_Q//_/ }"
printf '%-26s %-44s %s\n' ".ply bytes / Gaussians" "$S_PLY / $S_GAUSS" "$D_PLY / $D_GAUSS"
printf '%-26s %-44s %s\n' "training image size" "$S_SIZE" "(same flags)"
printf '%-26s %-44s %s\n' "resume" "$RESUMED" "-"
printf '%-26s %-44s %s\n' "wall: preprocessing" "${PREP_S:-?} s" "-"
printf '%-26s %-44s %s\n' "wall: training" "${FIRST_LEG_S} s + restart ${SECOND_LEG_S} s" "$DIRECT_S s"
echo "gpu_check: OK in $((SECONDS - T0)) s"
