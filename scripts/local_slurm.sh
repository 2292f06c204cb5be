#!/usr/bin/env bash
# A single-node SLURM on this machine, for the cluster tests and for trying `hydra/launcher=slurm`:
#
#   scripts/local_slurm.sh start    install (apt, once) and start munge, MariaDB, slurmdbd, slurmctld, slurmd
#   scripts/local_slurm.sh status   what runs, and sinfo
#   scripts/local_slurm.sh stop     stop what `start` started
#
# One node with this machine's CPUs and memory, in one partition (`debug`). Accounting runs
# through slurmdbd on a private MariaDB, because submitit learns that a job ended without a
# result (killed, cancelled, out of memory) only from `sacct`; without accounting a sweep would
# wait for such a job forever. Every file lives under $DROPSTUDY_SLURM_DIR (default
# /tmp/dropstudy-slurm), except /etc/slurm/slurm.conf, a link to the one there, which
# sinfo/sbatch read. Needs root (it starts the daemons as root, SlurmUser=root). Idempotent:
# `start` on a running SLURM only says so, `stop` on a stopped one does nothing.
set -euo pipefail

DIR=${DROPSTUDY_SLURM_DIR:-/tmp/dropstudy-slurm}
HOST=$(hostname -s)
DB_PORT=${DROPSTUDY_SLURM_DB_PORT:-3307}
CONF=$DIR/etc/slurm.conf
DAEMONS=(slurmd slurmctld slurmdbd mariadbd munged)

say() { echo "local-slurm: $*"; }

pid_of() {  # the pid in $DIR/run/NAME.pid, when that process is alive
    local file=$DIR/run/$1.pid
    [[ -s $file ]] && kill -0 "$(cat "$file")" 2>/dev/null && cat "$file"
}

wait_for() {  # wait_for SECONDS WHAT COMMAND...: until COMMAND succeeds, or fail naming WHAT
    local seconds=$1 what=$2
    shift 2
    for _ in $(seq "$((seconds * 2))"); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    say "$what did not come up within ${seconds}s; its log is under $DIR/log"
    return 1
}

install_packages() {
    local missing=()
    for tool in slurmctld:slurmctld slurmd:slurmd sinfo:slurm-client slurmdbd:slurmdbd munged:munge \
                mariadbd:mariadb-server; do
        command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
    done
    if ((${#missing[@]})); then
        say "installing ${missing[*]} (apt-get)"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

start_munge() {
    if pid_of munged >/dev/null || munge -n </dev/null >/dev/null 2>&1; then
        say "munged already running"
        return
    fi
    [[ -s /etc/munge/munge.key ]] || { mungekey --create --keyfile=/etc/munge/munge.key; chown munge: /etc/munge/munge.key; }
    install -d -o munge -g munge /run/munge /var/log/munge /var/lib/munge
    runuser -u munge -- munged --pid-file=/run/munge/dropstudy-munged.pid
    wait_for 10 munged munge -n </dev/null
    cp /run/munge/dropstudy-munged.pid "$DIR/run/munged.pid"
    say "started munged (pid $(cat "$DIR/run/munged.pid"))"
}

start_mariadb() {
    if pid_of mariadbd >/dev/null; then
        say "mariadbd already running"
        return
    fi
    if [[ ! -d $DIR/mysql/mysql ]]; then
        mariadb-install-db --user=root --datadir="$DIR/mysql" --auth-root-authentication-method=socket \
            >"$DIR/log/mariadb-install.log" 2>&1
    fi
    mariadbd --user=root --datadir="$DIR/mysql" --socket="$DIR/run/mysql.sock" --bind-address=127.0.0.1 \
        --port="$DB_PORT" --pid-file="$DIR/run/mariadbd.pid" --log-error="$DIR/log/mariadbd.log" \
        --innodb-buffer-pool-size=32M >/dev/null 2>&1 &
    wait_for 60 mariadbd mariadb --socket="$DIR/run/mysql.sock" -e "select 1"
    mariadb --socket="$DIR/run/mysql.sock" -e "
        CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
    say "started mariadbd on 127.0.0.1:$DB_PORT (pid $(cat "$DIR/run/mariadbd.pid"))"
}

write_configs() {
    local node cpus memory
    # slurmd's own view of the node, less 10% of its memory for the daemons and the submitting shell.
    node=$(slurmd -C | head -1)
    cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$node")
    memory=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
    memory=$((memory * 9 / 10))
    cat >"$DIR/etc/slurmdbd.conf" <<EOF
# written by scripts/local_slurm.sh
AuthType=auth/munge
DbdHost=localhost
DbdPort=${DROPSTUDY_SLURMDBD_PORT:-6819}
SlurmUser=root
LogFile=$DIR/log/slurmdbd.log
PidFile=$DIR/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$DIR/etc/slurmdbd.conf"
    cat >"$CONF" <<EOF
# written by scripts/local_slurm.sh: one node, this machine
ClusterName=dropstudy
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPort=${DROPSTUDY_SLURMCTLD_PORT:-6817}
SlurmdPort=${DROPSTUDY_SLURMD_PORT:-6818}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
# Jobs that a time limit, a requeue or a preemption stops may be queued again.
JobRequeue=1
# Seconds between SIGTERM and SIGKILL: time for a run to write its checkpoint.
KillWait=30
MinJobAge=300
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=${DROPSTUDY_SLURMDBD_PORT:-6819}
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=$HOST CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
    # sinfo, sbatch and scontrol read /etc/slurm/slurm.conf; never replace one this script did not write.
    if [[ -e /etc/slurm/slurm.conf && ! -L /etc/slurm/slurm.conf ]]; then
        say "/etc/slurm/slurm.conf exists and is not ours; export SLURM_CONF=$CONF to use this SLURM"
    else
        mkdir -p /etc/slurm
        ln -sfn "$CONF" /etc/slurm/slurm.conf
    fi
}

start_slurm_daemons() {
    export SLURM_CONF=$CONF
    if pid_of slurmdbd >/dev/null; then
        say "slurmdbd already running"
    else
        slurmdbd  # reads slurmdbd.conf beside $SLURM_CONF
        wait_for 30 slurmdbd sacctmgr -n list cluster
        say "started slurmdbd (pid $(cat "$DIR/run/slurmdbd.pid"))"
    fi
    sacctmgr -i -Q add cluster dropstudy >/dev/null 2>&1 || true
    if pid_of slurmctld >/dev/null; then
        say "slurmctld already running"
    else
        slurmctld
        wait_for 30 slurmctld scontrol ping
        say "started slurmctld (pid $(cat "$DIR/run/slurmctld.pid"))"
    fi
    if pid_of slurmd >/dev/null; then
        say "slurmd already running"
    else
        slurmd
        say "started slurmd (pid $(cat "$DIR/run/slurmd.pid" 2>/dev/null || echo '?'))"
    fi
    node_idle() { sinfo -h -N -o %T | grep -qE '^(idle|mixed|allocated)'; }
    if ! wait_for 30 "the node" node_idle; then
        scontrol update nodename="$HOST" state=resume || true
        wait_for 15 "the node" node_idle
    fi
}

start() {
    [[ $(id -u) == 0 ]] || { say "needs root (it starts the SLURM daemons as root)"; exit 1; }
    install_packages
    mkdir -p "$DIR"/{etc,run,log,state,spool,mysql}
    start_munge
    start_mariadb
    write_configs
    start_slurm_daemons
    say "ready: $(sinfo -h -o '%P %a %D node(s) %C CPUs(A/I/O/T) %T')  (SLURM_CONF=$CONF)"
}

stop() {
    local stopped=0
    # No job outlives the cluster: one left queued would start again at the next `start`.
    if pid_of slurmctld >/dev/null; then
        SLURM_CONF=$CONF scancel --full --quiet --user="$(id -un)" || true
    fi
    for name in "${DAEMONS[@]}"; do
        local pid
        if pid=$(pid_of "$name"); then
            kill "$pid"
            for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
            say "stopped $name (pid $pid)"
            stopped=1
        fi
        rm -f "$DIR/run/$name.pid"
    done
    ((stopped)) || say "nothing was running"
    # The controller's state (its next job id) and the accounting database stay: job ids never
    # repeat, so `sacct -j ID` never answers with an older job's record.
}

status() {
    local running=0
    for name in "${DAEMONS[@]}"; do
        local pid
        if pid=$(pid_of "$name"); then
            say "$name running (pid $pid)"
            running=1
        else
            say "$name not running"
        fi
    done
    if ((running)) && SLURM_CONF=$CONF sinfo >/dev/null 2>&1; then
        SLURM_CONF=$CONF sinfo
    else
        return 1
    fi
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
