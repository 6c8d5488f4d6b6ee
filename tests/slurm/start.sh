#!/usr/bin/env bash
# A real SLURM cluster for the tests, two nodes on this machine: munged, MariaDB, slurmdbd, slurmctld, 2 x slurmd (Debian's packages).
#
#   tests/slurm/start.sh DIR     # installs slurm-wlm, munge, slurmdbd, mariadb-server if missing (root + apt),
#                                # writes a private config under DIR, starts the daemons, waits for an idle node,
#                                # and prints `export SLURM_CONF=DIR/etc/slurm.conf`
#   tests/slurm/stop.sh DIR      # cancels the jobs, stops exactly the daemons started here (DIR/run/*.pid)
#
# Everything is private to DIR: config (SLURM_CONF), ports picked free at start, the munge socket (AuthInfo=socket=)
# and the database, so a SLURM or MariaDB already on the machine is neither used nor disturbed.
# Why the settings below (measured with slurm-wlm 22.05 on a 2-core container):
#   - proctrack/linuxproc + task/none: a container has no usable cgroups; linuxproc still finds every process
#     of a job by parentage, so `scancel` and the time limit kill the whole tree.
#   - accounting through slurmdbd + MariaDB: without it `sacct` fails, submitit cannot see a job's state and
#     waits forever on a cancelled job; `launch status` reads sacct too.
#   - cred_expire=10, sched_interval=1, bf_interval=1: a requeued job restarts ~13 s after its requeue instead of
#     the default ~120 s (it waits for its old credential to expire), and submissions start within a second.
#   - two nodes on this one machine (SLURM_TEST_NODES=2, the default): one slurmd each (`slurmd -N NAME`, its own
#     port, spool and pid file through %n), so that multi-node jobs and a run resumed on another --nodes are real.
#     The nodes are named after names that already resolve to this machine ($(hostname -s), then localhost): the
#     trainer's rendezvous address is the first node's name, as on a real cluster.
set -euo pipefail

DIR=${1:?usage: tests/slurm/start.sh DIR}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
WAIT_S=${SLURM_TEST_WAIT_S:-60}  # bound on each wait below; a daemon that is not up by then has failed

log() { echo "[slurm-test] $*" >&2; }
die() { log "error: $*"; exit 1; }
# Never leave half a cluster behind: on failure, stop whatever was started (stop.sh reads DIR/run/*.pid).
trap 'rc=$?; [ $rc = 0 ] || "$(dirname "$0")/stop.sh" "$DIR"; exit $rc' EXIT

# -- packages ------------------------------------------------------------------------------------------------
need=()
for bin in munged slurmctld slurmd slurmdbd sbatch mariadbd mariadb-install-db; do
  command -v "$bin" >/dev/null || need+=("$bin")
done
if ((${#need[@]})); then
  [ "$(id -u)" = 0 ] || die "missing ${need[*]} and not root: cannot apt-get install them"
  command -v apt-get >/dev/null || die "missing ${need[*]} and no apt-get to install them"
  log "installing slurm-wlm munge slurmdbd mariadb-server (missing: ${need[*]})"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  # Debian's maintainer scripts would start the system's munge, mariadb and slurm services on a host with an init
  # system; those are not ours to start (nor would stop.sh stop them): policy-rc.d 101 forbids it for this install.
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && added_policy=1; fi
  apt-get install -y -qq --no-install-recommends slurm-wlm munge slurmdbd mariadb-server >/dev/null
  [ -z "${added_policy:-}" ] || rm -f "$policy"
fi

# -- layout and ports ----------------------------------------------------------------------------------------
for pidfile in "$DIR"/run/*.pid; do
  if [ -e "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then die "$DIR is in use ($pidfile): stop.sh it first"; fi
done
# A fresh cluster every time: job ids restart at 1, so state or accounting left from an earlier start would mix
# old jobs with new ones.
rm -rf "$DIR"/{etc,run,log,munge,spool,db}
mkdir -p "$DIR"/{etc,run,log,munge,spool/ctld,db}
chmod 700 "$DIR/munge"

used_ports() {  # listening TCP ports, from /proc (no ss/netstat, no gawk needed on a bare machine)
  local f addr state
  for f in /proc/net/tcp /proc/net/tcp6; do
    [ -r "$f" ] || continue
    while read -r _ addr _ state _; do
      if [ "$state" = 0A ]; then echo $((16#${addr##*:})); fi
    done < <(tail -n +2 "$f")
  done
}
pick_ports() {  # N distinct free ports in 40000-59999 (20000-39999: training master ports, see pipeline/distributed.py)
  local used picked=() p
  used=" $(used_ports | tr '\n' ' ') "
  while ((${#picked[@]} < $1)); do
    p=$((40000 + RANDOM % 20000))
    [[ $used == *" $p "* || " ${picked[*]} " == *" $p "* ]] || picked+=("$p")
  done
  echo "${picked[@]}"
}
read -r CTLD_PORT DBD_PORT DB_PORT SLURMD_PORTS <<<"$(pick_ports 5)"
read -r -a SLURMD_PORTS <<<"$SLURMD_PORTS"  # the last two: one per slurmd

HOST=$(hostname -s)
NODES=("$HOST")
[ "${SLURM_TEST_NODES:-2}" = 1 ] || NODES+=(localhost)
[ "${SLURM_TEST_NODES:-2}" -le 2 ] || die "SLURM_TEST_NODES: 1 or 2 (the names that resolve here)"
# SLURM_TEST_CPUS: CPUs each node advertises (default: its cores). The tests advertise more than the machine has so
# that two 2-rank jobs run side by side: they spend most of their time waiting on SLURM's timers, not computing.
CPUS=${SLURM_TEST_CPUS:-$(nproc)}
MEM_MB=$(awk '/MemTotal/ { print int($2 / 1024 * 0.9) }' /proc/meminfo)
SOCKET=$DIR/munge/munge.socket
DB_PASS=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')

wait_for() {  # wait_for WHAT COMMAND...: poll COMMAND every 0.2 s for at most WAIT_S seconds
  local what=$1; shift
  for _ in $(seq $((WAIT_S * 5))); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  die "$what not ready after ${WAIT_S}s (logs: $DIR/log/)"
}

# -- munge: own key, own socket ------------------------------------------------------------------------------
head -c 1024 /dev/urandom > "$DIR/munge/munge.key"
chmod 400 "$DIR/munge/munge.key"
# --force: munged refuses to run as root, or with a key not owned by a `munge` user, unless forced.
munged --force --key-file="$DIR/munge/munge.key" --socket="$SOCKET" --pid-file="$DIR/run/munged.pid" \
  --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munge.seed"
wait_for munged munge --socket="$SOCKET" -n

# -- MariaDB for slurmdbd: private datadir, loopback TCP on a free port --------------------------------------
mariadb-install-db --no-defaults --datadir="$DIR/db" --user=root --auth-root-authentication-method=normal \
  --skip-test-db >"$DIR/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed: $DIR/log/mariadb-install.log"
mariadbd --no-defaults --datadir="$DIR/db" --user=root --bind-address=127.0.0.1 --port="$DB_PORT" \
  --socket="$DIR/run/mariadb.sock" --pid-file="$DIR/run/mariadbd.pid" --log-error="$DIR/log/mariadb.log" \
  --skip-log-bin --innodb-buffer-pool-size=64M --innodb-log-file-size=16M --skip-name-resolve \
  >/dev/null 2>&1 &
wait_for mariadbd mariadb --no-defaults --socket="$DIR/run/mariadb.sock" -uroot -e 'select 1'
mariadb --no-defaults --socket="$DIR/run/mariadb.sock" -uroot -e "
  CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"

# -- SLURM config --------------------------------------------------------------------------------------------
AUTH="AuthType=auth/munge
AuthInfo=socket=$SOCKET,cred_expire=10"
cat > "$DIR/etc/slurmdbd.conf" <<EOF
$AUTH
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
chmod 600 "$DIR/etc/slurmdbd.conf"

cat > "$DIR/etc/slurm.conf" <<EOF
# Written by tests/slurm/start.sh: a private one-node cluster for the tests.
ClusterName=pipelinetest
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
$AUTH
CredType=cred/munge
StateSaveLocation=$DIR/spool/ctld
SlurmdSpoolDir=$DIR/spool/d-%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
PlugStackConfig=$DIR/etc/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# For slurmdbd connections the munge socket is named here, not by AuthInfo.
AccountingStoragePass=$SOCKET
JobCompType=jobcomp/none
ReturnToService=2
# A task gets SIGTERM, then KillWait seconds to save a checkpoint before SIGKILL.
KillWait=30
InactiveLimit=0
MinJobAge=600
SlurmdTimeout=300
# The node may advertise more CPUs than it has (SLURM_TEST_CPUS): take the configured figures as they are.
SlurmdParameters=config_overrides
$(for i in "${!NODES[@]}"; do
  echo "NodeName=${NODES[$i]} NodeHostname=${NODES[$i]} NodeAddr=127.0.0.1 Port=${SLURMD_PORTS[$i]} CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN"
done)
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
PartitionName=short Nodes=ALL MaxTime=30 State=UP
EOF
: > "$DIR/etc/plugstack.conf"  # no SPANK plugins (Debian's /etc/slurm one would be read otherwise)
export SLURM_CONF=$DIR/etc/slurm.conf

# -- daemons -------------------------------------------------------------------------------------------------
slurmdbd
wait_for slurmdbd bash -c "exec 3<>/dev/tcp/127.0.0.1/$DBD_PORT"
slurmctld
wait_for slurmctld scontrol ping
for node in "${NODES[@]}"; do
  mkdir -p "$DIR/spool/d-$node"
  slurmd -N "$node"
done
nodes_idle() { [ "$(sinfo -h -N -p debug -o %t | sort -u)" = idle ] && [ "$(sinfo -h -N -p debug | wc -l)" = ${#NODES[@]} ]; }
wait_for "nodes ${NODES[*]} idle" nodes_idle
wait_for "accounting (sacct)" sacct -n -X -S now
log "up: SLURM_CONF=$SLURM_CONF, nodes ${NODES[*]} with $CPUS CPUs each, partition debug"
echo "export SLURM_CONF=$SLURM_CONF"
