#!/usr/bin/env bash
# ray-cluster.sh -- start a Ray cluster across the nodes of a SLURM allocation, and stop it again.
#
# Sourced by mbir-ray.sbatch and mbir-array.sbatch (inside the batch step, on the first node):
#   source ray-cluster.sh; mbir_ray_start   # sets MBIR_RAY_ADDRESS=ip:port, returns when all nodes joined
#   mbir-batch submit ... --address "$MBIR_RAY_ADDRESS"
#   mbir_ray_stop                           # SIGTERM to this job's Ray steps only (never a node-wide `ray stop`)
# Run by srun on every node (not by hand):  bash ray-cluster.sh node head|worker
#
# One Ray node per SLURM node: the head on the first node, a worker on each other node, each a
# `ray start --block` job step (srun --overlap) that owns that node's CPUs and GPUs.
#   CPUs: SLURM_CPUS_PER_TASK, else SLURM_CPUS_ON_NODE, else nproc.
#   GPUs: SLURM_GPUS_ON_NODE, else the number of entries in CUDA_VISIBLE_DEVICES (handed to Ray
#         unchanged, so Ray's GPU ids index the devices SLURM gave this step).
# Ports (explicit, for firewalls; 100 consecutive ports from MBIR_RAY_PORT, which defaults to a
# per-job value so that two jobs on one node do not collide):
#   +0 GCS (--port)   +1 node manager   +2 object manager   +3 dashboard   +4 ray client server
#   +5 dashboard agent gRPC   +6 dashboard agent HTTP   +7 metrics export   +8 runtime env agent
#   +10..+99 worker processes (--min/max-worker-port)
#
# Settings (environment):
#   MBIR_VENV                 activate this virtualenv first (its bin/ has mbir-batch and ray)
#   MBIR_BATCH=mbir-batch     the mbir-batch command (may be several words, e.g. "python -m mbir_batch.cli")
#   MBIR_RAY=ray              the ray command
#   MBIR_RAY_PORT             base port (default 20000 + 100 * (SLURM_JOB_ID % 300))
#   MBIR_RAY_HEAD_IP          the head's address as other nodes reach it (default: first of `hostname -I`)
#   MBIR_RAY_DASHBOARD=1      start the dashboard on the head (0: no dashboard)
#   MBIR_RAY_DASHBOARD_HOST=127.0.0.1   bind address of the dashboard (use an ssh tunnel to reach it)
#   MBIR_RAY_OBJECT_STORE_BYTES         object store size per node (default: Ray's)
#   MBIR_RAY_TMPDIR           Ray's session folder (default /tmp/ray-slurm-$SLURM_JOB_ID)
#   MBIR_RAY_START_TIMEOUT=180          seconds to wait for the head and for every node to join
#   RAY_AUTH_MODE=token       Ray token authentication; the token is RAY_AUTH_TOKEN if set, else a fresh
#                             one per job (also written to $MBIR_RAY_TMPDIR/auth_token, mode 600)

_mbir_log() { echo "[mbir-ray $(date +%H:%M:%S)] $*" >&2; }

_mbir_ray_env() {
  MBIR_BATCH=${MBIR_BATCH:-mbir-batch}
  MBIR_RAY=${MBIR_RAY:-ray}
  MBIR_RAY_PORT=${MBIR_RAY_PORT:-$((20000 + 100 * (${SLURM_JOB_ID:-0} % 300)))}
  MBIR_RAY_TMPDIR=${MBIR_RAY_TMPDIR:-/tmp/ray-slurm-${SLURM_JOB_ID:-0}}
  MBIR_RAY_START_TIMEOUT=${MBIR_RAY_START_TIMEOUT:-180}
  export MBIR_BATCH MBIR_RAY MBIR_RAY_PORT MBIR_RAY_TMPDIR MBIR_RAY_START_TIMEOUT
  # on SIGTERM a `ray start --block` node drains for up to this long before it stops its processes
  export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}
  export RAY_USAGE_STATS_ENABLED=${RAY_USAGE_STATS_ENABLED:-0}
  # Token auth with one token per job, handed to every node, the driver and `ray status` through
  # the environment (srun exports it): clients and servers must agree on the mode, and Ray 2.60
  # otherwise picks "token" for servers only when ~/.ray/auth_token happens to exist.
  export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
  if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ]; then
    RAY_AUTH_TOKEN=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n'); export RAY_AUTH_TOKEN
  fi
}

_mbir_node_gpus() {
  if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then echo "$SLURM_GPUS_ON_NODE"; return; fi
  case "${CUDA_VISIBLE_DEVICES:-}" in
    "" | NoDevFiles) echo 0 ;;
    *) awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES" ;;
  esac
}

# Runs on one node under srun: `ray start --block` as the head or a worker.
_mbir_ray_node() {
  local role=$1 cpus gpus p=$MBIR_RAY_PORT
  cpus=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-$(nproc)}}
  gpus=$(_mbir_node_gpus)
  local common=(--num-cpus "$cpus" --num-gpus "$gpus" --block --disable-usage-stats
    --node-manager-port $((p + 1)) --object-manager-port $((p + 2)) --dashboard-agent-grpc-port $((p + 5))
    --dashboard-agent-listen-port $((p + 6)) --metrics-export-port $((p + 7)) --runtime-env-agent-port $((p + 8))
    --min-worker-port $((p + 10)) --max-worker-port $((p + 99)))
  [ -n "${MBIR_RAY_OBJECT_STORE_BYTES:-}" ] && common+=(--object-store-memory "$MBIR_RAY_OBJECT_STORE_BYTES")
  _mbir_log "$role on $(hostname): $cpus CPUs, $gpus GPUs (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset})"
  if [ "$role" = head ]; then
    local dashboard=true
    [ "${MBIR_RAY_DASHBOARD:-1}" = 0 ] && dashboard=false
    common+=(--head --node-ip-address "$MBIR_RAY_HEAD_IP" --port "$p" --temp-dir "$MBIR_RAY_TMPDIR"
      --include-dashboard "$dashboard" --dashboard-host "${MBIR_RAY_DASHBOARD_HOST:-127.0.0.1}"
      --dashboard-port $((p + 3)) --ray-client-server-port $((p + 4)))
  else
    common+=(--address "$MBIR_RAY_HEAD_IP:$p")
  fi
  # srun turns SIGTERM into SIGKILL for its tasks but forwards SIGUSR1: on SIGUSR1 (or a direct
  # SIGTERM) `ray start --block` gets SIGTERM and stops every process it started on this node.
  $MBIR_RAY start "${common[@]}" &
  local ray_pid=$!
  trap 'kill -TERM "$ray_pid" 2>/dev/null || true' USR1 TERM
  while kill -0 "$ray_pid" 2>/dev/null; do wait "$ray_pid" || true; done
}

# Number of nodes alive in the cluster at $1 (0 when it does not answer).
_mbir_ray_nodes_alive() {
  $MBIR_RAY status --address "$1" 2>/dev/null \
    | awk '/^Active:/ {on = 1; next} /^Pending:/ {on = 0} on && /node_/ {n++} END {print n + 0}'
}

mbir_ray_start() {
  _mbir_ray_env
  local nodes head n self deadline
  self=${MBIR_SLURM_DIR:?MBIR_SLURM_DIR must name the folder of ray-cluster.sh}/ray-cluster.sh
  mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  head=${nodes[0]}; n=${#nodes[@]}
  MBIR_RAY_HEAD_IP=${MBIR_RAY_HEAD_IP:-$(hostname -I 2>/dev/null | awk '{print $1}')}
  MBIR_RAY_HEAD_IP=${MBIR_RAY_HEAD_IP:-$(hostname -i | awk '{print $1}')}
  export MBIR_RAY_HEAD_IP
  MBIR_RAY_ADDRESS="$MBIR_RAY_HEAD_IP:$MBIR_RAY_PORT"; export MBIR_RAY_ADDRESS
  _mbir_log "job ${SLURM_JOB_ID:-?}: $n node(s) [${nodes[*]}], head $head at $MBIR_RAY_ADDRESS"
  # --overlap: the Ray steps share the allocation with each other and with the driver
  srun --overlap --nodes=1 --ntasks=1 --nodelist="$head" bash "$self" node head &
  MBIR_RAY_HEAD_PID=$!
  MBIR_RAY_WORKERS_PID=
  deadline=$(($(date +%s) + MBIR_RAY_START_TIMEOUT))
  until [ "$(_mbir_ray_nodes_alive "$MBIR_RAY_ADDRESS")" -ge 1 ]; do
    kill -0 "$MBIR_RAY_HEAD_PID" 2>/dev/null || { _mbir_log "ERROR: the Ray head exited"; return 1; }
    [ "$(date +%s)" -lt "$deadline" ] || { _mbir_log "ERROR: no Ray head after ${MBIR_RAY_START_TIMEOUT}s"; mbir_ray_stop; return 1; }
    sleep 1
  done
  if [ "$n" -gt 1 ]; then
    srun --overlap --nodes=$((n - 1)) --ntasks=$((n - 1)) --ntasks-per-node=1 --exclude="$head" \
      bash "$self" node worker &
    MBIR_RAY_WORKERS_PID=$!
  fi
  until [ "$(_mbir_ray_nodes_alive "$MBIR_RAY_ADDRESS")" -ge "$n" ]; do
    [ "$(date +%s)" -lt "$deadline" ] || { _mbir_log "ERROR: only $(_mbir_ray_nodes_alive "$MBIR_RAY_ADDRESS")/$n nodes joined"; mbir_ray_stop; return 1; }
    sleep 1
  done
  if [ "$RAY_AUTH_MODE" = token ]; then  # the dashboard asks for it; keep it out of the job log
    (umask 077; printf '%s' "$RAY_AUTH_TOKEN" > "$MBIR_RAY_TMPDIR/auth_token")
    _mbir_log "Ray auth token (dashboard, ray CLI): $MBIR_RAY_TMPDIR/auth_token on $head"
  fi
  _mbir_log "Ray cluster up: $n node(s)"
}

# Stop this job's Ray: SIGUSR1 to the srun steps, which forward it to the node scripts, which stop
# their `ray start --block` with SIGTERM (see _mbir_ray_node). A node-wide `ray stop` would also
# kill other jobs' (other users') Ray on shared nodes, so it is never used.
mbir_ray_stop() {
  local pid i
  for pid in ${MBIR_RAY_WORKERS_PID:-} ${MBIR_RAY_HEAD_PID:-}; do
    kill -USR1 "$pid" 2>/dev/null || continue
    for ((i = 0; i < 60; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "$pid" 2>/dev/null; then kill -TERM "$pid" 2>/dev/null || true; fi  # srun: SIGKILL the step
    wait "$pid" 2>/dev/null || true
  done
  MBIR_RAY_WORKERS_PID='' MBIR_RAY_HEAD_PID=''
  _mbir_log "Ray cluster stopped"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  case "${1:-}" in
    node) _mbir_ray_env; _mbir_ray_node "${2:?usage: ray-cluster.sh node head|worker}" ;;
    *) echo "usage: bash ray-cluster.sh node head|worker (run by srun from mbir-ray.sbatch)" >&2; exit 2 ;;
  esac
fi
