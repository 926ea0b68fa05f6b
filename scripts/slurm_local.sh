#!/usr/bin/env bash
# A real SLURM on this machine, as a one-node cluster: munge + slurmctld + slurmd, started as root without systemd
# or cgroups (proctrack/linuxproc, task/none), the node with the CPUs and memory slurmd detects, one `debug`
# partition whose time limits are enforced, SLURM's own record of finished jobs in a jobcomp text file.
#
#   bash scripts/slurm_local.sh start    # install (apt, only what is missing), configure, start; no-op if it answers
#   bash scripts/slurm_local.sh status   # exit 0 when the cluster answers and the node is usable
#   bash scripts/slurm_local.sh stop     # stop the daemons this script started
#
# Config, state, spool, logs and pid files live in SLURM_LOCAL_DIR (default .slurm/ of this project, git-ignored).
# Outside it: the apt packages, the munge key /etc/munge/munge.key (munge reads no other) and a symlink
# /etc/slurm/slurm.conf -> SLURM_LOCAL_DIR/slurm.conf, so that sbatch/squeue/scancel run by AiiDA (which passes no
# SLURM_CONF) find the cluster. An /etc/slurm/slurm.conf this script did not make is never replaced.
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=$(realpath -m "${SLURM_LOCAL_DIR:-$PWD/.slurm}")
CONF="$DIR/slurm.conf"
SYSTEM_CONF=/etc/slurm/slurm.conf
MARKER='# written by aiida-mlip scripts/slurm_local.sh'
# minutes: the debug partition's MaxTime; above aiida-quantumespresso's default pw.x walltime of 12 h, else its
# jobs would be refused
MAXTIME=${SLURM_LOCAL_MAXTIME:-1440}
DEFAULT_TIME=${SLURM_LOCAL_DEFAULT_TIME:-30}  # minutes: a job's time limit when it asks for none
# SLURM_LOCAL_SCHEDULER_PARAMETERS replaces SchedulerParameters (e.g. batch_sched_delay=3, SLURM's default)
export SLURM_CONF="$CONF"

die() { echo "slurm_local: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "runs as root (SlurmUser=root, munge key in /etc/munge); use sudo"

usage() { echo "usage: bash scripts/slurm_local.sh start|stop|status" >&2; exit 2; }

answers() {  # the controller answers and the node is usable (idle, mixed or allocated)
  # Without its config file a SLURM client retries for 60 s before it gives up: look first.
  [ -e "$SLURM_CONF" ] || return 1
  scontrol ping 2>/dev/null | grep -q 'is UP' || return 1
  local state
  state=$(sinfo -h -N -o '%T' 2>/dev/null | head -n 1)
  case "$state" in idle*|mix*|alloc*|completing*) return 0 ;; *) return 1 ;; esac
}

where() {
  echo "config:  $(readlink -f "$SLURM_CONF")"
  echo "jobcomp: $(scontrol show config 2>/dev/null | sed -n 's/^JobCompLoc *= *//p')"
  echo "logs:    $(dirname "$(scontrol show config 2>/dev/null | sed -n 's/^SlurmctldLogFile *= *//p')")"
  sinfo -o '%P %a %l %D %T %N %c %m' 2>/dev/null || true
}

install_packages() {
  local missing=()
  for package in slurm-wlm munge; do dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package"); done
  for command in slurmctld slurmd sbatch munged; do command -v "$command" >/dev/null || missing+=(slurm-wlm munge); done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "== apt-get install slurm-wlm munge"
    apt-get update -qq
    # No systemd here: the packages' postinst scripts cannot start the services, which is what we want.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
  fi
}

start_munge() {
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  fi
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown -R munge:munge /run/munge /var/lib/munge /var/log/munge
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    return 0
  fi
  # As the munge user, like the Debian service; as root (--force) where that fails.
  runuser -u munge -- munged 9>&- || munged --force 9>&-
  touch "$DIR/run/munged.ours"  # stop ends only a munged this script started
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0; sleep 0.1; done
  die "munged does not answer (see /var/log/munge/munged.log)"
}

write_config() {
  # The node line exactly as slurmd sees the hardware: a RealMemory above the real one would drain the node.
  local node
  node=$(slurmd -C | head -n 1)
  case "$node" in NodeName=*) ;; *) die "slurmd -C printed no node line: $node" ;; esac
  cat > "$CONF" <<EOF
$MARKER
ClusterName=aiidamlip
SlurmctldHost=$(hostname -s)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# No systemd, no cgroups: processes tracked through /proc, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SchedulerType=sched/backfill
# Start a batch job at the scheduler's next tick (<= 1 s) instead of up to batch_sched_delay (default 3 s) later:
# measured 0.9-1.0 s from sbatch to the end of an empty job, 1.9-3.0 s with the default.
SchedulerParameters=${SLURM_LOCAL_SCHEDULER_PARAMETERS:-batch_sched_delay=0}
# Only CPUs are consumed: jobs that ask for no memory can share the node.
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
# SLURM's own record of every finished job (state, time limit, start and end), one line a job.
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.log
# Time limits are enforced: no grace minutes, 5 s between SIGTERM and SIGKILL.
OverTimeLimit=0
KillWait=5
# A job asking for more than the partition allows is refused at sbatch, not left pending for ever.
EnforcePartLimits=ALL
InactiveLimit=0
MinJobAge=300
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
$node State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=$MAXTIME DefaultTime=$DEFAULT_TIME State=UP
EOF
}

link_system_conf() {
  mkdir -p "$(dirname "$SYSTEM_CONF")"
  if [ -L "$SYSTEM_CONF" ] || [ ! -e "$SYSTEM_CONF" ]; then
    local target
    target=$(readlink -f "$SYSTEM_CONF" 2>/dev/null || true)
    if [ -L "$SYSTEM_CONF" ] && [ "$target" != "$CONF" ] && [ -f "$target" ] && ! grep -qF "$MARKER" "$target"; then
      die "$SYSTEM_CONF points to $target, a configuration this script did not write: not replaced"
    fi
    ln -sfn "$CONF" "$SYSTEM_CONF"
  elif ! grep -qF "$MARKER" "$SYSTEM_CONF"; then
    die "$SYSTEM_CONF exists and was not written by this script: not replaced (another SLURM is configured here)"
  else
    ln -sfn "$CONF" "$SYSTEM_CONF"
  fi
}

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
  # A cluster that answers through /etc/slurm/slurm.conf (this project's or another checkout's) is used as it is.
  if SLURM_CONF=$SYSTEM_CONF answers; then
    export SLURM_CONF=$SYSTEM_CONF
    echo "SLURM answers already: nothing started"
    where
    return 0
  fi
  install_packages
  mkdir -p "$DIR"/{state,spool,log,run}
  start_munge
  write_config
  link_system_conf
  if ! pid_alive "$DIR/run/slurmctld.pid"; then
    slurmctld -f "$CONF" 9>&- || die "slurmctld did not start: $(tail -n 5 "$DIR/log/slurmctld.log" 2>/dev/null)"
  fi
  if ! pid_alive "$DIR/run/slurmd.pid"; then
    slurmd -f "$CONF" 9>&- || die "slurmd did not start: $(tail -n 5 "$DIR/log/slurmd.log" 2>/dev/null)"
  fi
  local node
  node=$(hostname -s)
  for i in $(seq 150); do
    if answers; then
      echo "SLURM started: one node ($node), partition debug"
      where
      return 0
    fi
    # A node left down or drained by an earlier run (state kept in $DIR/state) is put back into service.
    if [ "$i" -eq 30 ]; then scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true; fi
    sleep 0.2
  done
  sinfo -N -l >&2 || true
  die "the node did not become idle within 30 s (logs: $DIR/log)"
}

stop_daemon() {  # pid file, name
  local pidfile=$1 name=$2
  pid_alive "$pidfile" || return 0
  local pid
  pid=$(cat "$pidfile")
  kill -TERM "$pid"
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || { echo "stopped $name ($pid)"; return 0; }; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  echo "killed $name ($pid)"
}

stop() {
  if ! pid_alive "$DIR/run/slurmd.pid" && ! pid_alive "$DIR/run/slurmctld.pid"; then
    echo "no SLURM daemon of $DIR is running"
  fi
  stop_daemon "$DIR/run/slurmd.pid" slurmd
  stop_daemon "$DIR/run/slurmctld.pid" slurmctld
  if [ -e "$DIR/run/munged.ours" ]; then
    stop_daemon /run/munge/munged.pid munged
    rm -f "$DIR/run/munged.ours"
  fi
  if [ -L "$SYSTEM_CONF" ] && [ "$(readlink -f "$SYSTEM_CONF")" = "$CONF" ]; then
    rm -f "$SYSTEM_CONF"
  fi
}

status() {
  export SLURM_CONF=$SYSTEM_CONF
  if answers; then
    echo "SLURM answers"
    where
  else
    echo "SLURM does not answer (bash scripts/slurm_local.sh start)"
    return 1
  fi
}

# One start or stop at a time (two test workers may start the cluster at once): a lock file next to the state,
# which the daemons must not inherit (9>&- where they start), or a later stop would wait for them for ever.
lock() { mkdir -p "$DIR"; exec 9>"$DIR/.lock"; flock 9; }

case "${1:-}" in
  start) lock; start ;;
  stop) lock; stop ;;
  status) status ;;
  *) usage ;;
esac
