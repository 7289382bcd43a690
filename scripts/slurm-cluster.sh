#!/usr/bin/env bash
# A one-node SLURM cluster on localhost, for CI and for trying the `slurm` profile on a
# workstation. Debian 12 (slurm-wlm 22.05), run as root.
#
#   scripts/slurm-cluster.sh up       install what is missing (apt-get), write the config, start
#                                     munged, [mariadb + slurmdbd], slurmctld, slurmd; wait for idle
#   scripts/slurm-cluster.sh down     stop every daemon it started, by PID, in reverse order
#   scripts/slurm-cluster.sh status   print what runs
#
# Environment:
#   SLURM_ACCOUNTING=dbd (default) | none
#       dbd: slurmdbd + MariaDB, so `sacct` works (the plugin's default status command).
#       none: no accounting; Snakemake then needs `--slurm-status-command squeue`.
#   SLURM_PARTITION=debug   name of the one partition.
#   MPVG_SLURM_FORCE=1      overwrite an /etc/slurm/slurm.conf this script did not write.
#
# Never point this at a machine that is part of a real cluster: it rewrites /etc/slurm.
set -euo pipefail

ACCOUNTING=${SLURM_ACCOUNTING:-dbd}
PARTITION=${SLURM_PARTITION:-debug}
MARK="# written by mpvg scripts/slurm-cluster.sh"
CONF=/etc/slurm/slurm.conf
DBDCONF=/etc/slurm/slurmdbd.conf
RUN=/run/slurm
LOG=/var/log/slurm
NODE=$(hostname -s)

say() { echo "slurm-cluster: $*" >&2; }
die() { say "ERROR: $*"; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "must run as root (it installs packages and starts daemons)"; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local limit=$1 what=$2; shift 2
    local i
    for ((i = 0; i < limit * 10; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    die "timed out after ${limit}s waiting for $what (logs in $LOG)"
}

install_packages() {
    local pkgs=(slurmctld slurmd slurm-client munge)
    [ "$ACCOUNTING" = dbd ] && pkgs+=(slurmdbd mariadb-server)
    local missing=()
    for p in "${pkgs[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

write_config() {
    if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF" && [ "${MPVG_SLURM_FORCE:-0}" != 1 ]; then
        die "$CONF exists and was not written by this script; set MPVG_SLURM_FORCE=1 to overwrite"
    fi
    getent hosts "$NODE" >/dev/null || echo "127.0.0.1 $NODE" >>/etc/hosts
    local cpus mem_mb storage
    cpus=$(nproc)
    # leave 10% of the memory to the system
    mem_mb=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
    if [ "$ACCOUNTING" = dbd ]; then storage=accounting_storage/slurmdbd; else storage=accounting_storage/none; fi
    mkdir -p /etc/slurm "$RUN" /var/spool/slurmctld /var/spool/slurmd "$LOG"
    chown slurm:slurm /var/spool/slurmctld "$LOG" "$RUN"
    cat >"$CONF" <<EOF
$MARK
ClusterName=ci
SlurmctldHost=$NODE
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=$storage
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
MinJobAge=300
KillWait=5
NodeName=$NODE CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    if [ "$ACCOUNTING" = dbd ]; then
        cat >"$DBDCONF" <<EOF
$MARK
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=slurm
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=slurmpw
EOF
        chown slurm:slurm "$DBDCONF"
        chmod 600 "$DBDCONF"
    fi
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_munge() {
    alive /run/munge/munged.pid && return 0
    mkdir -p /run/munge
    chown munge:munge /run/munge
    runuser -u munge -- /usr/sbin/munged
    wait_for 10 munged bash -c 'munge -n | unmunge'
}

start_dbd() {
    [ "$ACCOUNTING" = dbd ] || return 0
    if ! alive /run/mysqld/mysqld.pid; then
        mkdir -p /run/mysqld
        chown mysql:mysql /run/mysqld
        setsid /usr/sbin/mariadbd --user=mysql --skip-networking --socket=/run/mysqld/mysqld.sock \
            --pid-file=/run/mysqld/mysqld.pid </dev/null >"$LOG/mariadb.log" 2>&1 &
        wait_for 30 mariadb mariadb -e "SELECT 1"
        mariadb -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
                    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
    fi
    alive "$RUN/slurmdbd.pid" || /usr/sbin/slurmdbd
    wait_for 30 slurmdbd sacctmgr -n list cluster
}

start_slurm() {
    alive "$RUN/slurmctld.pid" || /usr/sbin/slurmctld
    wait_for 30 slurmctld bash -c 'scontrol ping | grep -q "is UP"'
    alive "$RUN/slurmd.pid" || /usr/sbin/slurmd
    wait_for 60 "node $NODE idle" bash -c '[ "$(sinfo -h -o %t | head -1)" = idle ] || [ "$(sinfo -h -o %t | head -1)" = mix ]'
}

up() {
    need_root
    local t0=$SECONDS
    if [ -f "$CONF" ] && grep -qF "$MARK" "$CONF" && alive "$RUN/slurmd.pid" && alive "$RUN/slurmctld.pid" \
        && sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
        say "already up (partition $(sinfo -h -o %P | head -1))"
        return 0
    fi
    install_packages
    write_config
    start_munge
    start_dbd
    start_slurm
    say "up in $((SECONDS - t0))s: node $NODE, partition $PARTITION, accounting $ACCOUNTING"
}

stop_pidfile() {  # stop_pidfile NAME PIDFILE
    local name=$1 pidfile=$2 pid i
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for ((i = 0; i < 200; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && { say "$name ($pid) did not stop; sending KILL"; kill -9 "$pid" || true; }
    fi
    rm -f "$pidfile"
}

down() {
    need_root
    stop_pidfile slurmd "$RUN/slurmd.pid"
    stop_pidfile slurmctld "$RUN/slurmctld.pid"
    stop_pidfile slurmdbd "$RUN/slurmdbd.pid"
    stop_pidfile mariadbd /run/mysqld/mysqld.pid
    stop_pidfile munged /run/munge/munged.pid
    say "down"
}

status() {
    local name pidfile
    for name in munged:/run/munge/munged.pid mariadbd:/run/mysqld/mysqld.pid slurmdbd:$RUN/slurmdbd.pid \
        slurmctld:$RUN/slurmctld.pid slurmd:$RUN/slurmd.pid; do
        pidfile=${name#*:}
        if alive "$pidfile"; then echo "${name%%:*} running (pid $(cat "$pidfile"))"; else echo "${name%%:*} stopped"; fi
    done
    command -v sinfo >/dev/null && sinfo 2>/dev/null || true
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
