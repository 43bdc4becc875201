#!/usr/bin/env bash
# local-cluster.sh -- a throw-away one-node SLURM on this machine, to try the sbatch scripts and to test them.
#
#   sudo bash slurm/local-cluster.sh start    # install SLURM + munge if needed, start them, print a "ready" line
#   sudo bash slurm/local-cluster.sh status   # what this script started, then sinfo and squeue (exit 0: running)
#   sudo bash slurm/local-cluster.sh stop     # cancel the jobs, stop only the daemons this script started
#   bash slurm/local-cluster.sh wait JOBID [TIMEOUT_S]   # wait for a job; exits with the job's exit code
#
#   jid=$(sbatch --parsable --cpus-per-task=2 slurm/mbir-ray.sbatch ct.zarr --method admm-tv --steps 3)
#   bash slurm/local-cluster.sh wait "$jid" 600 && echo "job $jid succeeded"
#
# Or source it and call local_cluster_start / local_cluster_stop / local_cluster_status /
# local_cluster_wait (safe under `set -euo pipefail`; nothing runs on `source`).
#
# The cluster: munged (reused when one already answers), slurmctld and slurmd for a node that is this
# machine as `slurmd -C` describes it (at 127.0.0.1), one partition "debug", no accounting database.
# `start` is idempotent: daemons it started and that still run are reused; a changed configuration
# (e.g. another MBIR_LOCAL_GPUS) restarts its slurmctld and slurmd. It writes /etc/slurm/slurm.conf
# (and gres.conf); a file found there that it did not write is kept as FILE.before-local-cluster and
# put back by `stop`. It adds the host name to /etc/hosts when that does not resolve. It refuses to
# run beside a slurmctld or slurmd that it did not start.
# `wait` polls every 0.5 s (sbatch --wait polls at growing intervals, up to a minute apart).
#
# Exit status: 0 done; 1 failed (the end of the daemon logs, /var/log/mbir-local-cluster/*.log, is
# printed); 2 usage; 77 a prerequisite is missing, with one line on stderr starting
# "[local-cluster] missing:" (not root; SLURM commands absent and no apt-get to install them;
# apt-get could not install the packages, e.g. without network).
#
# Settings (environment):
#   MBIR_LOCAL_GPUS=0           N > 0: the node advertises N fake GPUs (gres gpu:fake:N on /dev/fakegpuI, which
#                               behave as /dev/null), so --gpus=N and SLURM_GPUS_ON_NODE / CUDA_VISIBLE_DEVICES
#                               can be tried on a machine without GPUs
#   MBIR_LOCAL_TIMEOUT=60       seconds to wait for each daemon and for the node to come up
#   MBIR_LOCAL_MIN_JOB_AGE=300  seconds a finished job stays visible to scontrol (`wait` reads it there)
#   MBIR_LOCAL_STATE=/run/mbir-local-cluster   PID files of the daemons this script started
#
# Tested on Debian 12 (SLURM 22.05, munge 0.5) as root in a container without systemd.

MBIR_LOCAL_GPUS=${MBIR_LOCAL_GPUS:-0}
MBIR_LOCAL_TIMEOUT=${MBIR_LOCAL_TIMEOUT:-60}
MBIR_LOCAL_MIN_JOB_AGE=${MBIR_LOCAL_MIN_JOB_AGE:-300}
MBIR_LOCAL_STATE=${MBIR_LOCAL_STATE:-/run/mbir-local-cluster}

_LC_PACKAGES="munge slurmctld slurmd slurm-client"
_LC_COMMANDS="munged munge unmunge slurmctld slurmd sbatch scontrol sinfo squeue scancel runuser"
_LC_MARK="# written by mbir-batch slurm/local-cluster.sh"
_LC_APT_LOG=/tmp/mbir-local-cluster-apt.log
_LC_LIB=/var/lib/mbir-local-cluster   # slurmctld's saved state and slurmd's spool, apart from any other SLURM's
_LC_LOGS=/var/log/mbir-local-cluster
case ":$PATH:" in *:/usr/sbin:*) ;; *) PATH="$PATH:/usr/sbin:/sbin" ;; esac

_lc_say() { echo "[local-cluster] $*" >&2; }

# _lc_fail MESSAGE LOG...: an error, with the end of each daemon LOG.
_lc_fail() {
  local log
  _lc_say "ERROR: $1"; shift
  for log in "$@"; do
    _lc_say "last lines of $log:"
    [ ! -r "$log" ] || tail -n 15 "$log" | sed 's/^/    /' >&2
  done
  return 1
}

# _lc_poll SECONDS CMD...: true as soon as CMD succeeds (tried every 0.25 s), false after SECONDS.
_lc_poll() {
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.25
  done
}

# PIDs of the processes whose command name is $1.
_lc_pids_named() {
  local f name
  for f in /proc/[0-9]*/comm; do
    { read -r name <"$f"; } 2>/dev/null || continue
    [ "$name" = "$1" ] && { f=${f#/proc/}; echo "${f%/comm}"; }
  done
  return 0
}

# Is PID $1 alive and named $2? (A recorded PID may have been reused by another program.)
_lc_alive() {
  local name
  [ -n "${1:-}" ] && { read -r name <"/proc/$1/comm"; } 2>/dev/null && [ "$name" = "$2" ]
}

_lc_gone() { ! _lc_alive "$@"; }
_lc_pid_in() { [ -s "$1" ] && tr -dc 0-9 <"$1"; }               # the number in a PID file
_lc_recorded() { _lc_pid_in "$MBIR_LOCAL_STATE/$1.pid"; }       # PID of daemon $1, if this script started it
_lc_ours() { _lc_alive "$(_lc_recorded "$1")" "$1"; }           # started by this script and still running

_lc_absent_commands() {
  local c absent=""
  for c in $_LC_COMMANDS; do command -v "$c" >/dev/null 2>&1 || absent="$absent $c"; done
  echo "${absent# }"
}

# Returns 77 with one "missing:" line when this machine cannot run the cluster; installs the packages
# with apt-get when the commands are absent.
_lc_prerequisites() {
  local missing="" absent
  [ "$(id -u)" = 0 ] || missing="root (running as uid $(id -u); starting daemons and writing /etc/slurm need it)"
  absent=$(_lc_absent_commands)
  if [ -n "$absent" ] && ! command -v apt-get >/dev/null 2>&1; then
    missing="${missing:+$missing; }the commands $absent and apt-get to install them (packages: $_LC_PACKAGES)"
  fi
  [ -z "$missing" ] || { _lc_say "missing: $missing"; return 77; }
  [ -n "$absent" ] || return 0
  _lc_install || return 77
  absent=$(_lc_absent_commands)
  [ -z "$absent" ] || { _lc_say "missing: the commands $absent (not found after installing $_LC_PACKAGES)"; return 77; }
}

_lc_install() {
  local rc=0 made_policy=0 reason
  _lc_say "installing $_LC_PACKAGES with apt-get (log: $_LC_APT_LOG)"
  # Debian's maintainer scripts start daemons through invoke-rc.d; policy-rc.d answering 101 forbids
  # that, so that only this script starts them, and records their PIDs.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && made_policy=1
  fi
  {
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $_LC_PACKAGES \
      || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $_LC_PACKAGES; }
  } >"$_LC_APT_LOG" 2>&1 || rc=$?
  [ "$made_policy" = 0 ] || rm -f /usr/sbin/policy-rc.d
  [ "$rc" != 0 ] || return 0
  reason=$(grep -E '^(E|Err):' "$_LC_APT_LOG" | tail -1)
  _lc_say "missing: the packages $_LC_PACKAGES (apt-get install failed: ${reason:-exit $rc}; log: $_LC_APT_LOG)"
  return 1
}

_lc_munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

_lc_start_munge() {
  if _lc_munge_works; then
    _lc_ours munged || _lc_say "munged is already running (not started here; it is reused and left running)"
    return 0
  fi
  if [ ! -s /etc/munge/munge.key ]; then   # a fresh random key: this cluster has one node
    mkdir -p /etc/munge
    mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
      || head -c 1024 /dev/urandom >/etc/munge/munge.key
  fi
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
  chmod 700 /etc/munge && chmod 400 /etc/munge/munge.key && chmod 755 /run/munge
  # munged forks into the background and writes /run/munge/munged.pid; --force: a stale socket is fine
  rm -f /run/munge/munged.pid
  runuser -u munge -- "$(command -v munged)" --force \
    || { _lc_fail "munged did not start" /var/log/munge/munged.log; return 1; }
  _lc_poll "$MBIR_LOCAL_TIMEOUT" _lc_munge_works \
    || { _lc_fail "munged does not answer" /var/log/munge/munged.log; return 1; }
  _lc_pid_in /run/munge/munged.pid >"$MBIR_LOCAL_STATE/munged.pid"
}

# _lc_keep_original FILE: keep a file this script did not write as FILE.before-local-cluster.
_lc_keep_original() {
  [ -e "$1" ] && ! head -1 "$1" | grep -qxF "$_LC_MARK" || return 0
  [ -e "$1.before-local-cluster" ] || { cp -p "$1" "$1.before-local-cluster"
    _lc_say "kept the existing $1 as $1.before-local-cluster (\`stop\` puts it back)"; }
}

# _lc_put FILE < TEXT: write FILE when its text differs; status 10 when it changed, 0 when not.
_lc_put() {
  local text; text="$_LC_MARK"$'\n'"$(cat)"
  [ "$(cat "$1" 2>/dev/null)" != "$text" ] || return 0
  _lc_keep_original "$1"
  printf '%s\n' "$text" >"$1.new" && chmod 644 "$1.new" && mv -f "$1.new" "$1" && return 10
}

# _lc_drop FILE: remove FILE (keeping an original); status 10 when it existed.
_lc_drop() {
  [ -e "$1" ] || return 0
  _lc_keep_original "$1"; rm -f "$1"; return 10
}

# Writes slurm.conf and gres.conf for this machine's node; status 10 when either changed.
_lc_configure() {
  local hardware node gres="" changed=0 rc i
  hardware=$(slurmd -C | head -1)          # NodeName=HOST CPUs=.. Boards=.. ... RealMemory=..
  node=${hardware%% *}; node=${node#NodeName=}
  [ -n "$node" ] || { _lc_say "ERROR: \`slurmd -C\` did not describe this node"; return 1; }
  getent hosts "$node" >/dev/null || echo "127.0.0.1 $node" >>/etc/hosts
  echo "$node" >"$MBIR_LOCAL_STATE/node"
  mkdir -p /etc/slurm
  if [ "$MBIR_LOCAL_GPUS" -gt 0 ]; then
    for ((i = 0; i < MBIR_LOCAL_GPUS; i++)); do    # character device 1:3 is what /dev/null is
      [ -e "/dev/fakegpu$i" ] || mknod -m 666 "/dev/fakegpu$i" c 1 3 2>/dev/null || ln -s /dev/null "/dev/fakegpu$i"
    done
    gres="Gres=gpu:fake:$MBIR_LOCAL_GPUS"
    rc=0; _lc_put /etc/slurm/gres.conf <<EOF || rc=$?
AutoDetect=off
NodeName=$node Name=gpu Type=fake File=/dev/fakegpu[0-$((MBIR_LOCAL_GPUS - 1))]
EOF
  else
    rc=0; _lc_drop /etc/slurm/gres.conf || rc=$?
  fi
  case $rc in 0) ;; 10) changed=1 ;; *) return 1 ;; esac
  rc=0; _lc_put /etc/slurm/slurm.conf <<EOF || rc=$?
ClusterName=mbir-local
SlurmctldHost=$node(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$_LC_LIB/slurmctld
SlurmdSpoolDir=$_LC_LIB/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=$_LC_LOGS/slurmctld.log
SlurmdLogFile=$_LC_LOGS/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
GresTypes=gpu
ReturnToService=2
SlurmdTimeout=300
InactiveLimit=0
KillWait=5
MinJobAge=$MBIR_LOCAL_MIN_JOB_AGE
$hardware NodeAddr=127.0.0.1 $gres State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  case $rc in 0) ;; 10) changed=1 ;; *) return 1 ;; esac
  [ "$changed" = 0 ] || return 10
}

# _lc_stop_pid PID NAME: SIGTERM, up to MBIR_LOCAL_TIMEOUT s for it to exit, then SIGKILL.
_lc_stop_pid() {
  _lc_alive "$1" "$2" || return 0
  kill -TERM "$1" 2>/dev/null || true
  _lc_poll "$MBIR_LOCAL_TIMEOUT" _lc_gone "$1" "$2" && return 0
  _lc_say "$2 (pid $1) ignored SIGTERM for ${MBIR_LOCAL_TIMEOUT}s; sending SIGKILL"
  kill -KILL "$1" 2>/dev/null || true
}

# _lc_stop_ours NAME...: stop those of the named daemons this script started, all at once.
_lc_stop_ours() {
  local name pids=""
  for name in "$@"; do
    _lc_stop_pid "$(_lc_recorded "$name")" "$name" & pids="$pids $!"
  done
  # shellcheck disable=SC2086
  [ -z "$pids" ] || wait $pids
  for name in "$@"; do rm -f "$MBIR_LOCAL_STATE/$name.pid"; done
}

_lc_node_up() {
  case "$(sinfo -h -n "$(cat "$MBIR_LOCAL_STATE/node")" -o %T 2>/dev/null)" in
    idle | mixed | allocated | completing) return 0 ;;   # a trailing * (not responding) is not up
    *) return 1 ;;
  esac
}

# _lc_start_daemon NAME CHECK...: start daemon NAME (it forks into the background and writes
# /run/slurm/NAME.pid), wait until CHECK succeeds, record its PID.
_lc_start_daemon() {
  local name=$1 pidfile=/run/slurm/$1.pid; shift
  rm -f "$pidfile"   # left by a daemon that is gone (none of that name runs: checked before)
  "$(command -v "$name")" || { _lc_fail "$name did not start" "$_LC_LOGS/$name.log"; return 1; }
  _lc_poll "$MBIR_LOCAL_TIMEOUT" test -s "$pidfile" && _lc_poll "$MBIR_LOCAL_TIMEOUT" "$@" \
    || { _lc_fail "$name is not up after ${MBIR_LOCAL_TIMEOUT}s" "$_LC_LOGS/$name.log"; return 1; }
  _lc_pid_in "$pidfile" >"$MBIR_LOCAL_STATE/$name.pid"
}

local_cluster_start() {
  local began=$SECONDS rc=0 fresh=0 name pid others="" node job
  [[ $MBIR_LOCAL_GPUS =~ ^[0-9]+$ ]] \
    || { _lc_say "ERROR: MBIR_LOCAL_GPUS must be a whole number, not '$MBIR_LOCAL_GPUS'"; return 2; }
  _lc_prerequisites || return 77
  for name in slurmctld slurmd; do
    for pid in $(_lc_pids_named "$name"); do
      [ "$pid" = "$(_lc_recorded "$name")" ] || others="$others $name (pid $pid)"
    done
  done
  [ -z "$others" ] || { _lc_say "ERROR: a SLURM that this script did not start is running:$others; stop it first"; return 1; }
  mkdir -p "$MBIR_LOCAL_STATE" /run/slurm "$_LC_LOGS" "$_LC_LIB/slurmctld" "$_LC_LIB/slurmd"
  chown slurm:slurm /run/slurm "$_LC_LOGS" "$_LC_LIB/slurmctld"
  _lc_start_munge || return 1
  _lc_configure || rc=$?
  case $rc in
    0) ;;
    10) if _lc_ours slurmctld || _lc_ours slurmd; then
          _lc_say "configuration changed: restarting slurmctld and slurmd"; _lc_stop_ours slurmd slurmctld
        fi ;;
    *) return 1 ;;
  esac
  if ! _lc_ours slurmctld; then
    _lc_start_daemon slurmctld scontrol ping || return 1
    fresh=1
  fi
  _lc_ours slurmd || _lc_start_daemon slurmd true || return 1
  node=$(cat "$MBIR_LOCAL_STATE/node")
  if ! _lc_poll "$MBIR_LOCAL_TIMEOUT" _lc_node_up; then    # e.g. left DOWN or DRAINED by an earlier run
    scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true
    _lc_poll "$MBIR_LOCAL_TIMEOUT" _lc_node_up \
      || { sinfo -N -l >&2; _lc_fail "node $node is not up" "$_LC_LOGS/slurmctld.log" "$_LC_LOGS/slurmd.log"; return 1; }
  fi
  if [ "$fresh" = 1 ]; then   # a first job: ready means a job has run, not only that the daemons answer
    job=$(sbatch --parsable -J local-cluster-check -o /dev/null --wrap true) \
      || { _lc_say "ERROR: sbatch of the check job failed"; return 1; }
    local_cluster_wait "$job" "$MBIR_LOCAL_TIMEOUT" \
      || { _lc_fail "the check job $job failed" "$_LC_LOGS/slurmctld.log" "$_LC_LOGS/slurmd.log"; return 1; }
  fi
  echo "local SLURM ready: node $node, partition debug, $MBIR_LOCAL_GPUS fake GPU(s)," \
    "up in $((SECONDS - began)) s; stop it with: bash slurm/local-cluster.sh stop"
}

local_cluster_stop() {
  local file
  [ "$(id -u)" = 0 ] || { _lc_say "ERROR: stop needs root"; return 1; }
  [ -d "$MBIR_LOCAL_STATE" ] || { _lc_say "nothing to stop: no daemon recorded in $MBIR_LOCAL_STATE"; return 0; }
  if _lc_ours slurmctld && [ -n "$(squeue -h -o %i 2>/dev/null)" ]; then   # no job may outlive slurmd
    squeue -h -o %i | xargs -r scancel || true
    _lc_poll 20 test -z "$(squeue -h -o %i 2>/dev/null)" || _lc_say "jobs still listed after scancel"
  fi
  _lc_stop_ours slurmd slurmctld
  _lc_stop_ours munged
  for file in /etc/slurm/slurm.conf /etc/slurm/gres.conf; do
    if [ -e "$file.before-local-cluster" ]; then mv -f "$file.before-local-cluster" "$file"
    elif [ -e "$file" ] && head -1 "$file" | grep -qxF "$_LC_MARK"; then rm -f "$file"; fi
  done
  rm -f "$MBIR_LOCAL_STATE/node"; rmdir "$MBIR_LOCAL_STATE" 2>/dev/null || true
  _lc_say "stopped"
}

local_cluster_status() {
  local name up=0
  for name in munged slurmctld slurmd; do
    if _lc_ours "$name"; then echo "$name: running, pid $(_lc_recorded "$name"), started by local-cluster.sh"
    else echo "$name: not running from local-cluster.sh"; fi
  done
  _lc_ours slurmctld && _lc_ours slurmd && up=1
  [ "$up" = 0 ] || { sinfo; squeue; }
  [ "$up" = 1 ] || return 3
}

# local_cluster_wait JOBID [TIMEOUT_S]: poll the job every 0.5 s until it ends; the status is the
# job's exit code (1 when it ended without one, e.g. cancelled; 124 on timeout).
local_cluster_wait() {
  local job=${1:?usage: local_cluster_wait JOBID [TIMEOUT_S]} limit=${2:-3600} deadline info state code
  deadline=$((SECONDS + limit))
  while :; do
    info=$(scontrol -o show job "$job" 2>/dev/null) || info=""
    state="" code=""
    [[ $info =~ JobState=([A-Z_]+) ]] && state=${BASH_REMATCH[1]}
    [[ $info =~ [[:space:]]ExitCode=([0-9]+): ]] && code=${BASH_REMATCH[1]}
    case $state in
      COMPLETED) return "${code:-0}" ;;
      FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY | PREEMPTED | BOOT_FAIL | DEADLINE | REVOKED | SPECIAL_EXIT)
        _lc_say "job $job ended $state (exit code ${code:-none})"
        [ "${code:-0}" = 0 ] && return 1
        return "$code" ;;
      "") _lc_say "job $job is unknown to scontrol (never submitted, or ended over MBIR_LOCAL_MIN_JOB_AGE s ago)"; return 1 ;;
    esac
    [ "$SECONDS" -lt "$deadline" ] || { _lc_say "job $job is still $state after ${limit}s"; return 124; }
    sleep 0.5
  done
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  case "${1:-}" in
    start) local_cluster_start ;;
    stop) local_cluster_stop ;;
    restart) local_cluster_stop && local_cluster_start ;;
    status) local_cluster_status ;;
    wait) shift; local_cluster_wait "$@" ;;
    *) echo "usage: bash local-cluster.sh start|stop|restart|status|wait JOBID [TIMEOUT_S]" >&2; exit 2 ;;
  esac
fi
