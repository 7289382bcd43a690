#!/usr/bin/env bash
# A test SLURM cluster with GPU nodes on localhost, for CI and for trying the `slurm` profile on a
# workstation. Debian 12 (slurm-wlm 22.05), run as root.
#
#   scripts/slurm-cluster.sh up       install what is missing (apt-get), write the config, start
#                                     munged, [mariadb + slurmdbd], slurmctld, one slurmd per node;
#                                     wait until every node answers
#   scripts/slurm-cluster.sh down     stop every daemon it started, by PID, in reverse order
#   scripts/slurm-cluster.sh status   print what runs and the nodes' shape
#
# Shape: SLURM_NODES nodes n1, n2, ... on this one host, each its own `slurmd -N nK` with its own
# port (7818, 7819, ...; slurmdbd has 6819), each declaring SLURM_NODE_GPUS GPUs as gres on stand-in character
# devices (/run/slurm/gpus/nK/nvidiaI, made with `mknod c 195 I`: NVIDIA's major number; SLURM
# refuses regular files). SLURM allocates and binds them and exports CUDA_VISIBLE_DEVICES and
# SLURM_* as on a real cluster; no driver is behind them, so torch finds no CUDA and the
# processes run on CPU (gloo). Everything else is the real path.
# CPUs: each node declares SLURM_NODE_CPUS whatever the host has (SlurmdParameters=
# config_overrides). On a 2-core machine the default (4 per node, 8 in all) OVERSUBSCRIBES the
# cores on purpose, so that a 4-process job with one CPU per process fits one node, as the
# paper's geometry needs; jobs must stay small.
#
# Environment:
#   SLURM_ACCOUNTING=dbd (default) | none
#       dbd: slurmdbd + MariaDB, so `sacct` works (the plugin's default status command).
#       none: no accounting; Snakemake then needs `--slurm-status-command squeue`.
#   SLURM_PARTITION=debug   name of the one partition (all nodes).
#   SLURM_NODES=2           nodes n1..nN.
#   SLURM_NODE_GPUS=4       stand-in GPUs per node (0: no gres).
#   SLURM_NODE_CPUS=4       CPUs each node declares (see above).
#   SLURM_NODE_MEM_MB=4000  memory each node declares; jobs ask --mem per node within it.
#   MPVG_SLURM_FORCE=1      overwrite an /etc/slurm/slurm.conf this script did not write.
# `up` on a cluster of another shape restarts it with the asked-for one.
#
# Never point this at a machine that is part of a real cluster: it rewrites /etc/slurm.
set -euo pipefail

ACCOUNTING=${SLURM_ACCOUNTING:-dbd}
PARTITION=${SLURM_PARTITION:-debug}
NODES=${SLURM_NODES:-2}
NODE_GPUS=${SLURM_NODE_GPUS:-4}
NODE_CPUS=${SLURM_NODE_CPUS:-4}
NODE_MEM_MB=${SLURM_NODE_MEM_MB:-4000}
MARK="# written by mpvg scripts/slurm-cluster.sh"
CONF=/etc/slurm/slurm.conf
GRESCONF=/etc/slurm/gres.conf
DBDCONF=/etc/slurm/slurmdbd.conf
RUN=/run/slurm
GPUDIR=$RUN/gpus
LOG=/var/log/slurm
HOST=$(hostname -s)

say() { echo "slurm-cluster: $*" >&2; }
die() { say "ERROR: $*"; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "must run as root (it installs packages and starts daemons)"; }

node_names() { local i; for ((i = 1; i <= NODES; i++)); do echo "n$i"; done; }

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

check_shape() {
    [[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "SLURM_NODES must be a whole number >= 1, got '$NODES'"
    [[ "$NODE_GPUS" =~ ^[0-9]+$ ]] || die "SLURM_NODE_GPUS must be a whole number, got '$NODE_GPUS'"
    [[ "$NODE_CPUS" =~ ^[1-9][0-9]*$ ]] || die "SLURM_NODE_CPUS must be a whole number >= 1, got '$NODE_CPUS'"
    [[ "$NODE_MEM_MB" =~ ^[1-9][0-9]*$ ]] || die "SLURM_NODE_MEM_MB must be a whole number >= 1, got '$NODE_MEM_MB'"
}

write_config() {
    if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF" && [ "${MPVG_SLURM_FORCE:-0}" != 1 ]; then
        die "$CONF exists and was not written by this script; set MPVG_SLURM_FORCE=1 to overwrite"
    fi
    getent hosts "$HOST" >/dev/null || echo "127.0.0.1 $HOST" >>/etc/hosts
    local storage node i g gres=""
    if [ "$ACCOUNTING" = dbd ]; then storage=accounting_storage/slurmdbd; else storage=accounting_storage/none; fi
    [ "$NODE_GPUS" -gt 0 ] && gres=" Gres=gpu:$NODE_GPUS"
    mkdir -p /etc/slurm "$RUN" /var/spool/slurmctld "$LOG"
    chown slurm:slurm /var/spool/slurmctld "$LOG" "$RUN"
    cat >"$CONF" <<EOF
$MARK
ClusterName=ci
SlurmctldHost=$HOST
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd-%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmdParameters=config_overrides
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
DefMemPerCPU=500
AccountingStorageTRES=gres/gpu
GresTypes=gpu
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
MinJobAge=300
KillWait=30
EOF
    printf '%s\nAutoDetect=off\n' "$MARK" >"$GRESCONF"
    i=0
    for node in $(node_names); do
        echo "NodeName=$node NodeHostname=$HOST Port=$((7818 + i)) CPUs=$NODE_CPUS RealMemory=$NODE_MEM_MB$gres State=UNKNOWN" >>"$CONF"
        mkdir -p "/var/spool/slurmd-$node"
        rm -rf "${GPUDIR:?}/$node"
        if [ "$NODE_GPUS" -gt 0 ]; then
            mkdir -p "$GPUDIR/$node"
            for ((g = 0; g < NODE_GPUS; g++)); do mknod "$GPUDIR/$node/nvidia$g" c 195 "$g"; done
            echo "NodeName=$node Name=gpu File=$GPUDIR/$node/nvidia[0-$((NODE_GPUS - 1))]" >>"$GRESCONF"
        fi
        i=$((i + 1))
    done
    echo "PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >>"$CONF"
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

all_nodes_up() {  # every node of the config answers (idle, or busy with jobs)
    [ "$(sinfo -h -N -o '%N %t' 2>/dev/null | grep -cE ' (idle|mix|alloc)$')" -eq "$NODES" ]
}

start_slurm() {
    local node
    alive "$RUN/slurmctld.pid" || /usr/sbin/slurmctld
    wait_for 30 slurmctld bash -c 'scontrol ping | grep -q "is UP"'
    for node in $(node_names); do
        alive "$RUN/slurmd-$node.pid" || /usr/sbin/slurmd -N "$node"
    done
    wait_for 60 "nodes $(node_names | tr '\n' ' ')to be idle" all_nodes_up
}

# "n1 gpu:4 cpus:4 mem:4000, n2 ..." as SLURM reports it / as this call asks for it
shape() {
    sinfo -h -N -o '%N %G %c %m' 2>/dev/null | sort -u \
        | awk '{g=$2; sub(/\(.*/, "", g); if (g=="") g="gpu:0"; printf "%s%s %s cpus:%s mem:%s", (NR>1?", ":""), $1, g, $3, $4}'
}
wanted_shape() {
    local n sep=""
    for n in $(node_names); do printf '%s%s gpu:%s cpus:%s mem:%s' "$sep" "$n" "$NODE_GPUS" "$NODE_CPUS" "$NODE_MEM_MB"; sep=", "; done
}

up() {
    need_root
    check_shape
    local t0=$SECONDS
    if [ -f "$CONF" ] && grep -qF "$MARK" "$CONF" && alive "$RUN/slurmctld.pid" && all_nodes_up \
        && [ "$(shape)" = "$(wanted_shape)" ]; then
        say "already up: $(shape)"
        return 0
    fi
    if alive "$RUN/slurmctld.pid"; then
        say "running with another shape ($(shape)); restarting as $(wanted_shape)"
        stop_slurm
    fi
    install_packages
    write_config
    start_munge
    start_dbd
    start_slurm
    say "up in $((SECONDS - t0))s: $(shape); partition $PARTITION, accounting $ACCOUNTING"
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

slurmd_pidfiles() { compgen -G "$RUN/slurmd-*.pid" || true; }

stop_slurm() {
    local pidfile
    for pidfile in $(slurmd_pidfiles); do stop_pidfile slurmd "$pidfile"; done
    stop_pidfile slurmctld "$RUN/slurmctld.pid"
}

down() {
    need_root
    stop_slurm
    stop_pidfile slurmdbd "$RUN/slurmdbd.pid"
    stop_pidfile mariadbd /run/mysqld/mysqld.pid
    stop_pidfile munged /run/munge/munged.pid
    say "down"
}

status() {
    local name pidfile
    for name in munged:/run/munge/munged.pid mariadbd:/run/mysqld/mysqld.pid slurmdbd:$RUN/slurmdbd.pid \
        slurmctld:$RUN/slurmctld.pid $(for p in $(slurmd_pidfiles); do b=${p##*/}; echo "${b%.pid}:$p"; done); do
        pidfile=${name#*:}
        if alive "$pidfile"; then echo "${name%%:*} running (pid $(cat "$pidfile"))"; else echo "${name%%:*} stopped"; fi
    done
    command -v sinfo >/dev/null && sinfo -N -o '%N %t %G %c %m' 2>/dev/null || true
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
