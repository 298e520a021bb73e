#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, for the slurm-marked tests and for
# trying the SLURM launcher without a cluster. Run as root (it installs packages and
# starts daemons):
#
#   scripts/slurm_local.sh start    # install (first time), configure, start munge + slurmctld + slurmd
#   scripts/slurm_local.sh status   # daemons and `sinfo`
#   scripts/slurm_local.sh stop     # stop the daemons this script started
#
# Every subcommand is idempotent. `start` on a running, healthy cluster returns at once.
#
# What the configuration chooses, and why:
# - no slurmdbd (accounting_storage/none): `sacct` fails, so submitit logs "Bypassing
#   sacct error" and falls back to other queries; jobs still run and complete.
# - proctrack/linuxproc and task/none: no cgroup plugins, which need a cgroup setup
#   that containers (and gVisor) do not offer.
# - JobRequeue=1: jobs may be requeued (`scontrol requeue`), which is how a preempted
#   run comes back (training/slurm.py).
# - AuthInfo=cred_expire=10: a requeued job becomes eligible again after 10 s instead
#   of Slurm's default 120 s, so the requeue test takes seconds, not minutes.
# - SlurmdParameters=config_overrides: the node advertises SLURM_LOCAL_CPUS CPUs even
#   when the machine has fewer, so several small jobs can run side by side in tests.
#
# Environment knobs: SLURM_LOCAL_CPUS (default: nproc), SLURM_LOCAL_MEM_MB (default:
# 90% of MemTotal), SLURM_LOCAL_CONF_DIR (default /etc/slurm).
set -euo pipefail

CONF_DIR=${SLURM_LOCAL_CONF_DIR:-/etc/slurm}
CONF=$CONF_DIR/slurm.conf
STATE_DIR=/var/spool/slurmctld
SPOOL_DIR=/var/spool/slurmd
LOG_DIR=/var/log/slurm
RUN_DIR=/run/slurm
PARTITION=debug

die() { echo "slurm_local.sh: $*" >&2; exit 1; }

need_root() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages and starts daemons). Fix: sudo $0 $*"
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v munged >/dev/null && command -v sbatch >/dev/null; then
        return
    fi
    echo "slurm_local.sh: installing slurmctld slurmd munge slurm-client (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q slurmctld slurmd munge slurm-client >/dev/null \
        || { apt-get update -q >/dev/null && apt-get install -y -q slurmctld slurmd munge slurm-client >/dev/null; } \
        || die "apt-get could not install slurmctld slurmd munge slurm-client. Fix: check the Debian mirror, then rerun."
}

write_config() {
    local host cpus mem_mb
    host=$(hostname -s)
    cpus=${SLURM_LOCAL_CPUS:-$(nproc)}
    mem_mb=${SLURM_LOCAL_MEM_MB:-$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)}
    mkdir -p "$CONF_DIR" "$STATE_DIR" "$SPOOL_DIR" "$LOG_DIR" "$RUN_DIR"
    local new
    new=$(cat <<EOF
# Written by scripts/slurm_local.sh: single-node test cluster. Edits are overwritten.
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
# A requeued job waits cred_expire seconds before it may start again (default 120).
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
# Look at pending jobs every 2 s (default 60 s): a requeued job restarts promptly.
SchedulerParameters=sched_interval=2
SlurmdParameters=config_overrides
JobRequeue=1
ReturnToService=2
# KillWait: seconds between SIGTERM and SIGKILL (Slurm default 30): time to save a checkpoint.
KillWait=30
MinJobAge=600
InactiveLimit=0
Waittime=0
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
)
    if [[ ! -f $CONF ]] || [[ "$(cat "$CONF")" != "$new" ]]; then
        printf '%s\n' "$new" > "$CONF"
        echo "slurm_local.sh: wrote $CONF (CPUs=$cpus RealMemory=${mem_mb}MB)"
        return 0
    fi
    return 1  # unchanged
}

pid_alive() {  # pid_alive FILE: the pid in FILE names a running process
    [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

munge_pidfile=/run/munge/munged.pid

start_munge() {
    pid_alive "$munge_pidfile" && return
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 0755 /run/munge
    [[ -f /etc/munge/munge.key ]] || {
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    }
    runuser -u munge -- /usr/sbin/munged --pid-file="$munge_pidfile"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds=$1 what=$2; shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        (( SECONDS < deadline )) || die "$what did not come up within ${seconds}s. See $LOG_DIR/*.log"
        sleep 0.2
    done
}

node_ready() {  # the node accepts jobs (idle, mixed or allocated; not down/drained)
    local state
    state=$(sinfo -h -N -o '%T' 2>/dev/null | head -1)
    [[ $state =~ ^(idle|mixed|allocated|completing)$ ]]
}

cmd_start() {
    need_root start
    install_packages
    local changed=0
    write_config && changed=1
    start_munge
    wait_for 10 "munge" munge -n
    if (( changed )) && pid_alive $RUN_DIR/slurmctld.pid; then
        # New configuration: restart the daemons so they read it.
        cmd_stop_slurm
    fi
    if ! pid_alive $RUN_DIR/slurmctld.pid; then
        slurmctld -f "$CONF"
    fi
    wait_for 20 "slurmctld" scontrol ping
    if ! pid_alive $RUN_DIR/slurmd.pid; then
        slurmd -f "$CONF"
    fi
    wait_for 30 "slurmd" node_ready || true
    if ! node_ready; then
        # A node left down/drained by an earlier crash is returned to service.
        scontrol update NodeName="$(hostname -s)" State=RESUME 2>/dev/null || true
        wait_for 20 "slurmd (node state)" node_ready
    fi
    sinfo
}

stop_pidfile() {  # stop_pidfile FILE NAME: TERM the process, wait for it to exit
    local file=$1 name=$2 pid
    pid_alive "$file" || return 0
    pid=$(cat "$file")
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
    echo "slurm_local.sh: $name (pid $pid) ignored TERM for 10 s; sending KILL" >&2
    kill -9 "$pid" 2>/dev/null || true
}

cmd_stop_slurm() {
    stop_pidfile $RUN_DIR/slurmd.pid slurmd
    stop_pidfile $RUN_DIR/slurmctld.pid slurmctld
}

cmd_stop() {
    need_root stop
    cmd_stop_slurm
    stop_pidfile "$munge_pidfile" munged
    echo "slurm_local.sh: stopped"
}

cmd_status() {
    local ok=0
    for entry in "munged:$munge_pidfile" "slurmctld:$RUN_DIR/slurmctld.pid" "slurmd:$RUN_DIR/slurmd.pid"; do
        if pid_alive "${entry#*:}"; then
            echo "${entry%%:*}: running (pid $(cat "${entry#*:}"))"
        else
            echo "${entry%%:*}: stopped"; ok=1
        fi
    done
    if (( ok == 0 )); then
        sinfo
        node_ready || { echo "node not ready"; ok=1; }
    fi
    return $ok
}

case ${1:-} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    restart) cmd_stop; cmd_start ;;
    *) die "usage: $0 start|stop|status|restart" ;;
esac
