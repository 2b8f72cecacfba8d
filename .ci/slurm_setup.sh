#!/usr/bin/env bash
# Start a one-node Slurm cluster on this machine for tests/slurm/.
#
# Installs Debian's slurm-wlm (slurmctld + slurmd + client tools) and munge, writes a minimal
# slurm.conf for a single node on localhost, starts munged, slurmctld and slurmd as plain
# background daemons (no systemd) and waits until `sinfo` reports the node idle.
#
# Idempotent: running it again while the cluster is up only checks it (and resumes a node that was
# left DOWN/DRAINED). Needs root. Knobs (environment):
#   SLURM_SETUP_TIMEOUT   seconds to wait for the node to become idle (default 60)
#   SLURM_SETUP_CPUS      CPUs the node advertises (default: nproc, at least 2 so 2-task tests fit)
#   SLURM_SETUP_SKIP_APT  1 = never call apt-get (fail if the packages are missing)
# Logs: /var/log/slurm/{slurmctld,slurmd}.log, /var/log/munge/munged.log.
# See docs/slurm.md ("The CI cluster").
set -euo pipefail

log() { echo "[slurm_setup] $*"; }
die() {
    echo "[slurm_setup] ERROR: $*" >&2
    for f in /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log /var/log/munge/munged.log; do
        if [ -f "$f" ]; then
            echo "---- last lines of $f ----" >&2
            tail -n 20 "$f" >&2 || true
        fi
    done
    exit 1
}

[ "$(id -u)" = 0 ] || die "must run as root (installs packages and starts daemons)"

start_ts=$(date +%s)
TIMEOUT=${SLURM_SETUP_TIMEOUT:-60}
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
NODE=$(hostname -s)
[ -n "$NODE" ] || die "hostname -s printed nothing; set a hostname first"
# Jobs use the node name as their rendezvous address (first host of SLURM_JOB_NODELIST).
if ! getent hosts "$NODE" >/dev/null 2>&1; then
    log "adding '127.0.0.1 $NODE' to /etc/hosts so the node name resolves"
    echo "127.0.0.1 $NODE" >>/etc/hosts
fi

# ---------------------------------------------------------------- packages
need_install=0
for bin in sbatch srun scontrol sinfo squeue slurmctld slurmd munged munge; do
    command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || need_install=1
done
if [ "$need_install" = 1 ]; then
    [ "${SLURM_SETUP_SKIP_APT:-0}" = 1 ] && die "Slurm/munge binaries missing and SLURM_SETUP_SKIP_APT=1"
    log "installing slurm-wlm and munge from Debian"
    export DEBIAN_FRONTEND=noninteractive
    # Without systemd the packages' postinst would run their init scripts (and fail the install
    # when slurmctld cannot start unconfigured): a policy-rc.d that says "no" for the duration.
    added_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        added_policy=1
    fi
    apt_ok=1
    apt-get update -qq >/tmp/slurm_setup_apt.log 2>&1 \
        && apt-get install -y -qq --no-install-recommends slurm-wlm munge >>/tmp/slurm_setup_apt.log 2>&1 \
        || apt_ok=0
    [ "$added_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
    if [ "$apt_ok" = 0 ]; then
        tail -n 30 /tmp/slurm_setup_apt.log >&2
        die "apt-get install slurm-wlm munge failed (log: /tmp/slurm_setup_apt.log)"
    fi
fi
PATH=/usr/sbin:/usr/bin:$PATH

# ---------------------------------------------------------------- munge
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --keyfile=/etc/munge/munge.key --force
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
fi
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
chmod 0400 /etc/munge/munge.key

pid_alive() {  # pid_alive PIDFILE EXPECTED_COMM
    local pid
    [ -s "$1" ] || return 1
    pid=$(cat "$1" 2>/dev/null) || return 1
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$2" ]
}

if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "munged already running"
else
    log "starting munged"
    rm -f /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged --force || die "munged failed to start"
    for _ in $(seq 1 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.1
    done
    munge -n | unmunge >/dev/null || die "munge credentials do not round-trip (munge -n | unmunge)"
fi

# ---------------------------------------------------------------- slurm.conf
CPUS=${SLURM_SETUP_CPUS:-$(nproc)}
[ "$CPUS" -ge 2 ] || CPUS=2
# MemTotal in MiB, minus a margin; with config_overrides slurmd trusts these numbers anyway.
MEM_MB=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)

mkdir -p "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/slurm
NEW_CONF=$(mktemp)
cat >"$NEW_CONF" <<EOF
# Written by .ci/slurm_setup.sh: a one-node test cluster on localhost. Do not use in production.
ClusterName=orthrus-ci
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire seconds before it may start again (default 120 s); 10 s keeps
# the requeue tests short. Also the step credential lifetime: ample on one local node.
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
# No cgroups in containers / without systemd: track processes by parent pid, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Trust the node line below even where the hardware detection disagrees (VMs, containers).
SlurmdParameters=config_overrides
ReturnToService=2
# Batch jobs may be requeued (scontrol requeue, preemption); keep finished jobs visible to
# 'scontrol show job' for 10 minutes since there is no accounting database (no sacct).
JobRequeue=1
MinJobAge=600
# Time between SIGTERM and SIGKILL when a job is ended (requeue, scancel, time limit).
KillWait=20
# Schedule promptly: tests submit and wait.
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
MessageTimeout=20
SlurmctldTimeout=60
SlurmdTimeout=120
InactiveLimit=0
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM_MB} State=UNKNOWN
PartitionName=debug Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP
EOF
if ! cmp -s "$NEW_CONF" "$CONF"; then
    install -m 0644 "$NEW_CONF" "$CONF"
    log "wrote $CONF (node $NODE, CPUs=$CPUS, RealMemory=${MEM_MB}M)"
fi
rm -f "$NEW_CONF"
# Daemons started by an earlier run with another slurm.conf are restarted below.
STARTED_SHA=/run/slurm/started-with.sha256
conf_sha=$(sha256sum "$CONF" | cut -d' ' -f1)
conf_changed=0
[ "$(cat "$STARTED_SHA" 2>/dev/null || true)" = "$conf_sha" ] || conf_changed=1
# cgroup.conf is read by slurmd even with proctrack/linuxproc on some versions; keep it harmless.
[ -f "$CONF_DIR/cgroup.conf" ] || echo "CgroupPlugin=autodetect" >"$CONF_DIR/cgroup.conf"

# ---------------------------------------------------------------- daemons
stop_daemon() {  # stop_daemon PIDFILE COMM: the daemon this script started, by its pid file
    local pid
    pid_alive "$1" "$2" || return 0
    pid=$(cat "$1")
    log "stopping $2 (pid $pid): slurm.conf changed"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
        [ -d "/proc/$pid" ] || return 0
        sleep 0.1
    done
    die "$2 (pid $pid) did not stop within 10 s"
}
if [ "$conf_changed" = 1 ]; then
    # Some settings (AuthInfo, ports, node lines) are read only at start: restart, not reconfigure.
    stop_daemon /run/slurm/slurmd.pid slurmd
    stop_daemon /run/slurm/slurmctld.pid slurmctld
fi

if pid_alive /run/slurm/slurmctld.pid slurmctld; then
    log "slurmctld already running"
else
    log "starting slurmctld"
    # -i: ignore state files that do not match this configuration (e.g. a different hostname).
    slurmctld -i || die "slurmctld failed to start"
fi

for _ in $(seq 1 100); do
    scontrol ping 2>/dev/null | grep -q 'is UP' && break
    sleep 0.2
done
scontrol ping 2>/dev/null | grep -q 'is UP' || die "slurmctld does not answer 'scontrol ping'"

if pid_alive /run/slurm/slurmd.pid slurmd; then
    log "slurmd already running"
else
    log "starting slurmd"
    slurmd -N "$NODE" || die "slurmd failed to start"
fi
echo "$conf_sha" >"$STARTED_SHA"

# ---------------------------------------------------------------- wait for an idle node
deadline=$(( $(date +%s) + TIMEOUT ))
state=""
while :; do
    state=$(sinfo -h -n "$NODE" -o '%T' 2>/dev/null | head -n 1 || true)
    case "$state" in
        idle|mixed|allocated|completing) break ;;
        down*|drain*|drained*|fail*)
            # A node left down by an earlier run (ReturnToService=2 normally handles this).
            scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    if [ "$(date +%s)" -ge "$deadline" ]; then
        sinfo -N -l >&2 || true
        scontrol show node "$NODE" >&2 || true
        die "node $NODE is not usable after ${TIMEOUT}s (state: '${state:-none}')"
    fi
    sleep 0.5
done

log "cluster up in $(( $(date +%s) - start_ts ))s: node $NODE is $state"
sinfo
