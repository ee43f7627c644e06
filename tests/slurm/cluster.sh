#!/usr/bin/env bash
# A real SLURM cluster on this machine, for the tests and CI: one node on localhost, or several
# nodes, each in a Linux network namespace of its own.
#
# Usage (as root, on Debian 12):
#   eval "$(tests/slurm/cluster.sh start)"   # install if needed, start, wait for idle nodes;
#                                            # stdout is only `export SLURM_CONF=...`
#   tests/slurm/cluster.sh start --nodes 2   # two nodes, node1 and node2 (see below)
#   tests/slurm/cluster.sh status            # sinfo + squeue; exit 3 when not running,
#                                            # 1 when only some of its daemons run
#   tests/slurm/cluster.sh stop              # stop the daemons it started; safe to repeat
#   tests/slurm/cluster.sh node-down NODE    # a node dies: SIGKILL every process in its namespace
#   tests/slurm/cluster.sh node-up NODE      # start its slurmd again, wait until it is idle
#
# Daemons: mariadb (accounting DB), munged, slurmdbd, slurmctld, one slurmd per node, all run as
# root, all with their config, state, logs and pid files under one directory:
#   DEEPERCLUSTER_SLURM_DIR      state directory (default /tmp/deepercluster-slurm)
#   DEEPERCLUSTER_SLURM_PORT     first of four ports: slurmctld, slurmd, slurmdbd, mariadb
#                                (default 6817 -> 6817-6820)
#   DEEPERCLUSTER_SLURM_TIMEOUT  seconds to wait for each daemon and the idle nodes (default 60)
#   DEEPERCLUSTER_SLURM_SUBNET   first three bytes of the nodes' private /24 with --nodes N > 1
#                                (default 10.213.28: the host 10.213.28.1, node i 10.213.28.(10+i))
# One node: `localhost` (NodeAddr=127.0.0.1). N nodes: node1..nodeN, node i a slurmd in network
# namespace dcslurm-nodei (address .(10+i), a veth pair into the bridge dcslurm0, which holds the
# host's .1 where slurmctld listens; no route anywhere else) and in a UTS namespace whose hostname
# is its node name, with a hosts file naming every node bind-mounted on its /etc/hosts: SLURM,
# srun, submitit and torch.distributed see N machines (each with every CPU of this one). Jobs run
# in their node's namespaces; the file system is shared. Partition `debug`, cluster `deepercluster`,
# account `deepercluster` with the calling user in it. /etc/slurm/slurm.conf is made a link to the
# generated slurm.conf while the cluster runs (snakemake-executor-plugin-slurm drops SLURM_CONF
# inside jobs); a pre-existing one is kept aside and put back by `stop`.
# Progress goes to stderr. Daemons are stopped by the pid files written here, never by name.
set -euo pipefail

export PATH="$PATH:/usr/sbin:/sbin"
export LC_ALL=C

DIR=${DEEPERCLUSTER_SLURM_DIR:-/tmp/deepercluster-slurm}
case $DIR in /*) ;; *) DIR="$PWD/$DIR" ;; esac
PORT=${DEEPERCLUSTER_SLURM_PORT:-6817}
TIMEOUT=${DEEPERCLUSTER_SLURM_TIMEOUT:-60}
SUBNET=${DEEPERCLUSTER_SLURM_SUBNET:-10.213.28}
NODE_TIMEOUT=10 # SlurmdTimeout of a cluster of several nodes, in seconds
CTLD_PORT=$PORT
SLURMD_PORT=$((PORT + 1))
DBD_PORT=$((PORT + 2))
DB_PORT=$((PORT + 3))

CLUSTER=deepercluster
ACCOUNT=deepercluster
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server iproute2)

ETC=$DIR/etc
RUN=$DIR/run
LOG=$DIR/log
MUNGE=$DIR/munge
DB=$DIR/mysql
CONF=$ETC/slurm.conf
MUNGE_SOCKET=$MUNGE/munge.socket.2
DB_SOCKET=$DB/mysqld.sock
SYSTEM_CONF=/etc/slurm/slurm.conf
SYSTEM_BACKUP=/etc/slurm/slurm.conf.deepercluster-orig
POLICY=/usr/sbin/policy-rc.d

NODES_FILE=$ETC/nodes # the running cluster's node names, written by `start`
BRIDGE=dcslurm0

# Start order; `stop` goes in reverse. name -> executable, pid file, log file. One slurmd per node:
# `slurmd` for localhost, `slurmd-NODE` for the nodes of a cluster of several (set_nodes).
DAEMONS=()
declare -A EXE=([mariadbd]=mariadbd [munged]=munged [slurmdbd]=slurmdbd [slurmctld]=slurmctld)
declare -A LOGFILE=(
    [mariadbd]=$LOG/mariadb.log [munged]=$LOG/munged.log [slurmdbd]=$LOG/slurmdbd.log
    [slurmctld]=$LOG/slurmctld.log
)
NODES=()

# set_nodes NAME...: the cluster's nodes, and a slurmd daemon for each.
set_nodes() {
    NODES=("$@")
    DAEMONS=(mariadbd munged slurmdbd slurmctld)
    local node name
    for node in "${NODES[@]}"; do
        name=$(slurmd_name "$node")
        DAEMONS+=("$name")
        EXE[$name]=slurmd
        LOGFILE[$name]=$LOG/$name.log
    done
}

slurmd_name() { if [[ $1 == localhost ]]; then echo slurmd; else echo "slurmd-$1"; fi; }
netns() { echo "dcslurm-$1"; }
node_addr() { echo "$SUBNET.$((10 + ${1#node}))"; }
controller_addr() { if [[ ${NODES[0]} == localhost ]]; then echo 127.0.0.1; else echo "$SUBNET.1"; fi; }

say() { echo "cluster.sh: $*" >&2; }
die() { say "error: $*"; exit 1; }

pidfile() { echo "$RUN/$1.pid"; }

# Whether process $1 exists and is not a zombie: a daemon that forked away from us is reaped
# by init, which may take its time (seconds, in some containers).
alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ -n $stat && ${stat%% *} != Z ]]
}

# The pid of daemon $1 if its pid file names a live process running that executable.
live_pid() {
    local file pid exe
    file=$(pidfile "$1")
    [[ -s $file ]] || return 1
    pid=$(tr -dc 0-9 <"$file")
    [[ -n $pid ]] && alive "$pid" || return 1
    exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
    exe=${exe##*/}
    exe=${exe% (deleted)}
    # Debian installs slurmctld and slurmd as slurmctld-wlm and slurmd-wlm (alternatives).
    [[ $exe == "${EXE[$1]}" || $exe == "${EXE[$1]}-wlm" ]] || return 1
    echo "$pid"
}

running_count() {
    local n=0 d
    for d in "${DAEMONS[@]}"; do
        if live_pid "$d" >/dev/null; then n=$((n + 1)); fi
    done
    echo "$n"
}

log_tails() {
    local f
    for f in "$LOG"/*.log "$LOG"/*.out; do
        if [[ -s $f ]]; then
            echo "----- last lines of $f -----" >&2
            tail -n 25 "$f" >&2 || true
        fi
    done
}

# wait_for DESCRIPTION COMMAND...: retry COMMAND every 0.2 s until it succeeds or TIMEOUT.
wait_for() {
    local what=$1 deadline=$((SECONDS + TIMEOUT))
    shift
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            say "timed out after ${TIMEOUT}s waiting for $what"
            return 1
        fi
        sleep 0.2
    done
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

daemon_up() { live_pid "$1" >/dev/null; }

# ---------------------------------------------------------------------------------------
# install

missing_packages() {
    local p
    for p in "${PACKAGES[@]}"; do
        if [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true) != "install ok installed" ]]; then
            echo "$p"
        fi
    done
}

install_packages() {
    local missing
    if command -v dpkg-query >/dev/null; then
        missing=$(missing_packages | tr '\n' ' ')
    else
        missing="${PACKAGES[*]}"
    fi
    missing=${missing% }
    [[ -z $missing ]] && return 0
    command -v apt-get >/dev/null || die "packages missing ($missing) and no apt-get to install them"
    say "installing $missing"
    # Keep the packages' init scripts from starting their own munged, mariadb, slurm*.
    if [[ ! -e $POLICY ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$POLICY"
        chmod 755 "$POLICY"
        MADE_POLICY=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends -o Dpkg::Use-Pty=0 "${PACKAGES[@]}" >&2
    if [[ -n $MADE_POLICY ]]; then
        rm -f "$POLICY"
        MADE_POLICY=
    fi
}

# ---------------------------------------------------------------------------------------
# configuration

write_configs() {
    # Root runs daemons from here: refuse a directory (in /tmp, say) that someone else made.
    if [[ -e $DIR && ( ! -d $DIR || -L $DIR || $(stat -c %u "$DIR") != 0 ) ]]; then
        die "$DIR is not a directory owned by root: remove it or set DEEPERCLUSTER_SLURM_DIR"
    fi
    mkdir -p "$ETC" "$RUN" "$LOG" "$MUNGE" "$DB" "$DIR/state"
    local node
    for node in "${NODES[@]}"; do mkdir -p "$DIR/spool/$(slurmd_name "$node")"; done
    # munged wants its socket directory reachable by all, and nothing group/other-writable.
    chmod 755 "$DIR" "$ETC" "$RUN" "$LOG" "$MUNGE" "$DIR/spool"
    chmod 700 "$DIR/state" "$DB"
    rm -f "$LOG"/*.log "$LOG"/*.out # this run's logs only

    if [[ ! -s $MUNGE/munge.key ]]; then
        dd if=/dev/urandom of="$MUNGE/munge.key" bs=1024 count=1 status=none
    fi
    chmod 400 "$MUNGE/munge.key"

    local hw cpus mem realmem defmem
    hw=$(slurmd -C 2>/dev/null | head -n 1) || die "slurmd -C failed"
    cpus=$(sed -n 's/.*[[:space:]]CPUs=\([0-9]*\).*/\1/p' <<<"$hw")
    mem=$(sed -n 's/.*[[:space:]]RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
    [[ -n $cpus && -n $mem ]] || die "cannot read CPUs and RealMemory from 'slurmd -C': $hw"
    # A little below what slurmd measures, or the node drains on 'Low RealMemory'.
    realmem=$((mem * 95 / 100))
    # The nodes share this machine's memory (each has all of its CPUs).
    realmem=$((realmem / ${#NODES[@]}))
    # Without a default, CR_Core_Memory gives each job the whole node's memory: one job at a time.
    defmem=$((realmem / cpus))

    cat >"$CONF" <<EOF
# Generated by tests/slurm/cluster.sh: ${#NODES[@]} node(s) on this machine, daemons as root.
ClusterName=$CLUSTER
SlurmctldHost=localhost($(controller_addr))
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmctldPidFile=$(pidfile slurmctld)
SlurmctldLogFile=${LOGFILE[slurmctld]}
$(slurmd_paths)
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups, no systemd.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
# Start jobs as soon as they are submitted (the default waits on a 3 s grid).
SchedulerParameters=batch_sched_delay=0
# Keep finished jobs visible to squeue for 5 minutes.
MinJobAge=300
ReturnToService=2
KillWait=5
MailProg=/bin/true
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# The slurmctld-slurmdbd link does not use AuthInfo: name the munge socket here too.
AccountingStoragePass=$MUNGE_SOCKET
JobCompType=jobcomp/none
$(node_lines "$cpus" "$realmem")
PartitionName=debug Nodes=$(
        IFS=,
        echo "${NODES[*]}"
    ) Default=YES MaxTime=INFINITE State=UP DefMemPerCPU=$defmem
EOF
    chmod 644 "$CONF"
    if [[ ${NODES[0]} != localhost ]]; then write_hosts; fi

    local pass
    pass=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
    # slurmdbd reads slurmdbd.conf from the directory of SLURM_CONF; it must be 0600.
    (
        umask 077
        cat >"$ETC/slurmdbd.conf" <<EOF
# Generated by tests/slurm/cluster.sh.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$(pidfile slurmdbd)
LogFile=${LOGFILE[slurmdbd]}
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$pass
StorageLoc=slurm_acct_db
EOF
    )
    chmod 600 "$ETC/slurmdbd.conf"
    DB_PASS=$pass
}

# The slurmd paths of slurm.conf: one slurmd's own, or each node's (%n: its node name).
slurmd_paths() {
    local name=slurmd-%n
    if [[ ${NODES[0]} == localhost ]]; then name=slurmd; fi
    printf '%s\n' "SlurmdSpoolDir=$DIR/spool/$name" "SlurmdPidFile=$RUN/$name.pid" "SlurmdLogFile=$LOG/$name.log"
}

# node_lines CPUS MEMORY: the NodeName lines. With several nodes, a node that stops answering is
# DOWN, and its jobs requeued or ended, after SlurmdTimeout (NODE_TIMEOUT s), not the default 300 s.
node_lines() {
    local node
    if [[ ${NODES[0]} == localhost ]]; then
        echo "NodeName=localhost NodeAddr=127.0.0.1 CPUs=$1 RealMemory=$2 State=UNKNOWN"
        return
    fi
    echo "SlurmdTimeout=$NODE_TIMEOUT"
    for node in "${NODES[@]}"; do
        echo "NodeName=$node NodeAddr=$(node_addr "$node") NodeHostname=$node CPUs=$1 RealMemory=$2 State=UNKNOWN"
    done
}

# The nodes' /etc/hosts (bind-mounted in their namespaces): their names resolve to their addresses,
# so that torch.distributed's rendezvous (MASTER_ADDR, the first node's name) and gloo reach them.
write_hosts() {
    local node
    {
        echo "127.0.0.1 localhost"
        echo "$SUBNET.1 $(hostname)"
        for node in "${NODES[@]}"; do echo "$(node_addr "$node") $node"; done
    } >"$ETC/hosts"
    chmod 644 "$ETC/hosts"
}

link_system_conf() {
    mkdir -p /etc/slurm
    if [[ -L $SYSTEM_CONF && $(readlink "$SYSTEM_CONF") == "$CONF" ]]; then
        return 0
    fi
    if [[ -e $SYSTEM_CONF || -L $SYSTEM_CONF ]]; then
        if [[ -e $SYSTEM_BACKUP || -L $SYSTEM_BACKUP ]]; then
            die "$SYSTEM_CONF exists and so does its backup $SYSTEM_BACKUP; sort them out by hand"
        fi
        say "keeping the existing $SYSTEM_CONF as $SYSTEM_BACKUP"
        mv "$SYSTEM_CONF" "$SYSTEM_BACKUP"
    fi
    ln -s "$CONF" "$SYSTEM_CONF"
}

unlink_system_conf() {
    if [[ -L $SYSTEM_CONF && $(readlink "$SYSTEM_CONF") == "$CONF" ]]; then
        rm -f "$SYSTEM_CONF"
        if [[ -e $SYSTEM_BACKUP || -L $SYSTEM_BACKUP ]]; then
            mv "$SYSTEM_BACKUP" "$SYSTEM_CONF"
            say "restored $SYSTEM_CONF"
        fi
    fi
}

# ---------------------------------------------------------------------------------------
# daemons

start_mariadb() {
    if [[ ! -d $DB/mysql ]]; then
        say "initialising the accounting database in $DB"
        mariadb-install-db --no-defaults --datadir="$DB" --user=root --skip-test-db \
            --auth-root-authentication-method=socket >"$LOG/mariadb-install.log" 2>&1 ||
            { tail -n 30 "$LOG/mariadb-install.log" >&2; die "mariadb-install-db failed"; }
    fi
    rm -f "$DB_SOCKET"
    launch mariadbd mariadbd --no-defaults --user=root --datadir="$DB" --socket="$DB_SOCKET" \
        --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
        --pid-file="$(pidfile mariadbd)" --log-error="${LOGFILE[mariadbd]}" \
        --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900
    wait_for mariadb mariadb-admin --no-defaults --socket="$DB_SOCKET" -u root ping
    mariadb --no-defaults --socket="$DB_SOCKET" -u root <<EOF
CREATE OR REPLACE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
EOF
}

# launch NAME COMMAND...: run a daemon in the foreground of its own session, in the background
# of this script, stdio to $LOG/NAME.out, and write its pid file at once (the daemons write the
# same pid there themselves), so that a failure right after the launch still finds it to stop.
launch() {
    local name=$1
    shift
    setsid "$@" </dev/null >>"$LOG/$name.out" 2>&1 &
    echo "$!" >"$(pidfile "$name")"
    wait_for "$name to run" daemon_up "$name"
}

sacct_ready() { sacctmgr -n -P list cluster format=cluster; }

register_accounting() {
    local user
    user=$(id -un)
    if [[ -z $(sacctmgr -n -P list cluster "$CLUSTER" format=cluster) ]]; then
        sacctmgr -i add cluster "$CLUSTER" >&2
    fi
    if [[ -z $(sacctmgr -n -P list account "$ACCOUNT" format=account) ]]; then
        sacctmgr -i add account "$ACCOUNT" Cluster="$CLUSTER" \
            Description="deepercluster tests" Organization=deepercluster >&2
    fi
    if [[ -z $(sacctmgr -n -P list association cluster="$CLUSTER" account="$ACCOUNT" user="$user" format=user) ]]; then
        sacctmgr -i add user "$user" Account="$ACCOUNT" Cluster="$CLUSTER" >&2
    fi
    sacctmgr -i modify user "$user" set DefaultAccount="$ACCOUNT" >/dev/null 2>&1 || true
}

# Whether the nodes named (all of them by default) are idle.
node_idle() {
    local states
    (($#)) || set -- "${NODES[@]}"
    states=$(sinfo -h -N -n "$(
        IFS=,
        echo "$*"
    )" -o %T 2>/dev/null) || return 1
    [[ $(grep -cx idle <<<"$states") == "$#" ]]
}

# ---------------------------------------------------------------------------------------
# the nodes' network: a bridge on the host, a namespace and a veth pair per node

make_network() {
    remove_network
    ip link add "$BRIDGE" type bridge
    ip addr add "$SUBNET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    local node ns
    for node in "${NODES[@]}"; do
        ns=$(netns "$node")
        ip netns add "$ns"
        ip link add "dcslurm-$node" type veth peer name eth0 netns "$ns"
        ip link set "dcslurm-$node" master "$BRIDGE" up
        ip -n "$ns" addr add "$(node_addr "$node")/24" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$ns" link set lo up
    done
}

# Remove this script's namespaces (killing what still runs in them) and bridge, if any.
remove_network() {
    local ns pid
    for ns in $(ip netns list | awk '$1 ~ /^dcslurm-/ {print $1}'); do
        for pid in $(ip netns pids "$ns"); do kill -KILL "$pid" 2>/dev/null || true; done
        ip netns del "$ns"
    done
    if ip link show "$BRIDGE" >/dev/null 2>&1; then ip link del "$BRIDGE"; fi
}

# start_slurmd NODE: its slurmd, in the node's namespaces when it has them.
start_slurmd() {
    local name
    name=$(slurmd_name "$1")
    if [[ $1 == localhost ]]; then
        launch "$name" slurmd -D -f "$CONF" -N localhost
        return
    fi
    # nsenter and unshare exec (no fork): the pid launch records is slurmd's. Not `ip netns exec`: it
    # mounts a sysfs of its own, without the cgroup file system slurmd needs.
    # shellcheck disable=SC2016
    launch "$name" nsenter --net="/run/netns/$(netns "$1")" unshare --uts --mount -- \
        sh -c 'hostname "$1" && mount --bind "$2" /etc/hosts && shift 2 && exec "$@"' sh "$1" "$ETC/hosts" \
        slurmd -D -f "$CONF" -N "$1"
}

# On any failure of `start` (a timeout, a failing command, a signal): show why, then stop
# what was started, so that nothing blocks the next start on the same ports.
on_exit() {
    local rc=$?
    set +e
    if [[ -n $MADE_POLICY ]]; then rm -f "$POLICY"; fi
    if ((rc != 0)) && [[ -n $STARTING ]]; then
        STARTING=
        say "start failed; daemons' logs under $LOG"
        if daemon_up slurmctld; then scontrol show node >&2 2>/dev/null; fi
        log_tails
        stop_daemons
        unlink_system_conf
        remove_network
    fi
    exit "$rc"
}

# The nodes of a start with --nodes $1: localhost, or node1..node$1.
wanted_nodes() {
    [[ $1 =~ ^[1-9][0-9]*$ ]] || die "--nodes wants a positive number, not '$1'"
    if (($1 == 1)); then echo localhost; else seq -f 'node%g' 1 "$1"; fi
}

cmd_start() {
    [[ $(id -u) == 0 ]] || die "must run as root (the daemons run as root)"
    local count=1 running wanted
    while (($#)); do
        case $1 in
        --nodes) count=${2:-} && shift 2 ;;
        *) die "start: unknown option '$1' (start [--nodes N])" ;;
        esac
    done
    wanted=$(wanted_nodes "$count" | tr '\n' ' ')
    running=$(running_count)
    if ((running > 0)) && [[ "${NODES[*]} " != "$wanted" ]]; then
        say "running with nodes ${NODES[*]}, not ${wanted% }: stopping it to start afresh"
        cmd_stop
    fi
    # shellcheck disable=SC2086
    set_nodes $wanted
    running=$(running_count)
    if ((running == ${#DAEMONS[@]})); then
        say "already running from $DIR"
        export SLURM_CONF=$CONF
        link_system_conf
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    if ((running > 0)); then
        say "only $running of ${#DAEMONS[@]} daemons running from $DIR: stopping them to start afresh"
        cmd_stop
    fi
    local p
    for p in "$CTLD_PORT" "$SLURMD_PORT" "$DBD_PORT" "$DB_PORT"; do
        if port_open "$p"; then
            die "port $p on 127.0.0.1 is already in use (another cluster? set DEEPERCLUSTER_SLURM_PORT)"
        fi
    done

    STARTING=1
    install_packages
    write_configs
    echo "${NODES[*]}" >"$NODES_FILE"
    export SLURM_CONF=$CONF
    link_system_conf
    if [[ ${NODES[0]} != localhost ]]; then make_network; fi

    say "starting mariadb"
    start_mariadb
    say "starting munged"
    rm -f "$MUNGE_SOCKET"
    launch munged munged --foreground --socket="$MUNGE_SOCKET" --key-file="$MUNGE/munge.key" \
        --pid-file="$(pidfile munged)" --log-file="${LOGFILE[munged]}" --seed-file="$MUNGE/munged.seed"
    wait_for "munged's socket" test -S "$MUNGE_SOCKET"
    say "starting slurmdbd"
    launch slurmdbd slurmdbd -D
    wait_for "slurmdbd to answer" sacct_ready
    register_accounting
    say "starting slurmctld"
    # -c: no job or node state from an earlier start (a job it left queued would take the nodes).
    launch slurmctld slurmctld -D -c -f "$CONF"
    local node
    for node in "${NODES[@]}"; do
        say "starting $(slurmd_name "$node")"
        start_slurmd "$node"
    done
    wait_for "nodes ${NODES[*]} to be idle" node_idle
    STARTING=
    say "cluster up: $(sinfo -h -o '%P %D %T %c CPUs %m MB')"
    echo "export SLURM_CONF=$CONF"
}

# TERM each daemon by its pid file (reverse start order) and wait for it to exit.
stop_daemons() {
    local i name pid deadline
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        name=${DAEMONS[i]}
        if pid=$(live_pid "$name"); then
            kill -TERM "$pid" 2>/dev/null || true
            deadline=$((SECONDS + 30))
            while alive "$pid" && ((SECONDS < deadline)); do sleep 0.1; done
            if alive "$pid"; then
                say "$name ($pid) did not exit on TERM: killing it"
                kill -KILL "$pid" 2>/dev/null || true
                while alive "$pid"; do sleep 0.1; done
            fi
            say "stopped $name ($pid)"
            rm -f "$(pidfile "$name")"
        elif [[ -s $(pidfile "$name") ]]; then
            pid=$(tr -dc 0-9 <"$(pidfile "$name")")
            if [[ -n $pid ]] && alive "$pid"; then
                say "warning: $(pidfile "$name") names process $pid, which is not $name: left alone"
            else
                rm -f "$(pidfile "$name")"
            fi
        fi
    done
}

cmd_stop() {
    export SLURM_CONF=$CONF
    if live_pid slurmctld >/dev/null && [[ -f $CONF ]]; then
        # End the jobs still queued or running, so no job step outlives its slurmd.
        local jobs
        jobs=$(squeue -h -o %A -t PD,CF,R,S,CG 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            local deadline=$((SECONDS + 15))
            while [[ -n $(squeue -h -o %A -t PD,CF,R,S,CG 2>/dev/null || true) ]] && ((SECONDS < deadline)); do
                sleep 0.2
            done
        fi
    fi
    if (($(running_count) == 0)); then
        say "not running from $DIR"
    fi
    stop_daemons
    unlink_system_conf
    remove_network
}

# A node dies: every process in its namespace (its slurmd, its job steps and tasks) is SIGKILLed.
cmd_node_down() {
    local node=${1:-} pid
    [[ -n $node && $node != localhost && " ${NODES[*]} " == *" $node "* ]] || die "node-down: no node '$node' here"
    for pid in $(ip netns pids "$(netns "$node")"); do kill -KILL "$pid" 2>/dev/null || true; done
    say "killed every process of $node"
}

cmd_node_up() {
    local node=${1:-}
    [[ -n $node && $node != localhost && " ${NODES[*]} " == *" $node "* ]] || die "node-up: no node '$node' here"
    export SLURM_CONF=$CONF
    daemon_up "$(slurmd_name "$node")" || start_slurmd "$node"
    wait_for "node $node to be idle" node_idle "$node"
    say "$node is up"
}

cmd_status() {
    local running
    running=$(running_count)
    if ((running == 0)); then
        echo "cluster not running (state directory $DIR)"
        return 3
    fi
    export SLURM_CONF=$CONF
    local d pid
    for d in "${DAEMONS[@]}"; do
        if pid=$(live_pid "$d"); then echo "$d: running ($pid)"; else echo "$d: NOT running"; fi
    done
    echo "SLURM_CONF=$CONF"
    sinfo || true
    squeue || true
    # 0: all daemons up; 1: only some (`start` restarts them all).
    ((running == ${#DAEMONS[@]}))
}

MADE_POLICY=
STARTING=
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The nodes of the cluster started last from $DIR (one slurmd on localhost if none was).
if [[ -s $NODES_FILE ]]; then
    # shellcheck disable=SC2046
    set_nodes $(cat "$NODES_FILE")
else
    set_nodes localhost
fi

case ${1:-} in
start) cmd_start "${@:2}" ;;
stop) cmd_stop ;;
status) cmd_status ;;
node-down) cmd_node_down "${2:-}" ;;
node-up) cmd_node_up "${2:-}" ;;
*)
    echo "usage: $0 start [--nodes N]|stop|status|node-down NODE|node-up NODE" >&2
    exit 2
    ;;
esac
