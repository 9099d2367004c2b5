#!/usr/bin/env bash
# Start a throw-away single-node Slurm cluster (munge + slurmctld + slurmd [+ MariaDB + slurmdbd])
# with every file under $SLURM_TMP. Afterwards: export SLURM_CONF=$SLURM_TMP/etc/slurm.conf
# Env: SLURM_TMP        (required) directory for everything; created if missing
#      SLURM_NODE_CPUS  CPUs advertised by the node (default: nproc; more => more tiny jobs at once)
#      SLURM_WITH_DBD=1 also start MariaDB + slurmdbd so that plain `sacct` works
#      SLURM_CTLD_PORT / SLURM_SLURMD_PORT  fixed ports (default: random free loopback ports)
#      SLURM_EXTRA_CONF extra slurm.conf lines (e.g. "DependencyParameters=kill_invalid_depend")
set -euo pipefail
: "${SLURM_TMP:?set SLURM_TMP to a (new) temp dir}"
T=$SLURM_TMP
mkdir -p "$T"/{etc,munge,state,spool,log,run}
chmod 755 "$T/munge"          # munged warns unless the socket dir is world-executable
WITH_DBD=${SLURM_WITH_DBD:-0}

# four free TCP ports on loopback (slurmctld, slurmd, slurmdbd, mariadb); bound together => distinct
read -r CTLD_PORT SLURMD_PORT DBD_PORT DB_PORT < <(python3 -c '
import socket
ss=[socket.socket() for _ in range(4)]
for s in ss: s.bind(("127.0.0.1",0))
print(*[s.getsockname()[1] for s in ss])')
CTLD_PORT=${SLURM_CTLD_PORT:-$CTLD_PORT}; SLURMD_PORT=${SLURM_SLURMD_PORT:-$SLURMD_PORT}   # optional fixed ports
NODE=$(hostname -s)
CPUS=${SLURM_NODE_CPUS:-$(nproc)}
EXTRA=""
if [ "$CPUS" -gt "$(nproc)" ]; then EXTRA="SlurmdParameters=config_overrides"; fi
MEM_MB=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 - 1024 ))

wait_for() { # seconds, command...  -- poll every 0.1 s
  local n=$(( $1 * 10 )); shift
  for _ in $(seq 1 "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  return 1
}

# ---------- munge: private key and socket inside $T ----------
dd if=/dev/urandom of="$T/munge/munge.key" bs=1 count=1024 status=none
chmod 600 "$T/munge/munge.key"
munged --force \
  --socket="$T/munge/munge.sock" --key-file="$T/munge/munge.key" \
  --pid-file="$T/munge/munged.pid" --log-file="$T/log/munged.log" \
  --seed-file="$T/munge/munged.seed"          # forks; PID in munged.pid

ACCT="AccountingStorageType=accounting_storage/none"
if [ "$WITH_DBD" = 1 ]; then
  # ---------- MariaDB on 127.0.0.1:$DB_PORT, data in $T/db ----------
  mkdir -p "$T/db"
  mariadb-install-db --no-defaults --datadir="$T/db/data" --user=root \
    --auth-root-authentication-method=normal --skip-test-db >"$T/log/mariadb-install.log" 2>&1
  mariadbd --no-defaults --datadir="$T/db/data" --socket="$T/db/mysqld.sock" \
    --port="$DB_PORT" --bind-address=127.0.0.1 --user=root --skip-log-bin \
    --pid-file="$T/db/mysqld.pid" --log-error="$T/log/mariadb.log" \
    --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 >"$T/log/mariadb.out" 2>&1 &
  echo $! > "$T/run/mariadbd.fgpid"
  wait_for 60 mariadb-admin --no-defaults -S "$T/db/mysqld.sock" -u root ping \
    || { echo "mariadb did not start"; tail -20 "$T/log/mariadb.log"; exit 1; }
  # ---------- slurmdbd (reads slurmdbd.conf next to $SLURM_CONF; must be mode 600) ----------
  cat > "$T/etc/slurmdbd.conf" <<CONF
AuthType=auth/munge
AuthInfo=socket=${T}/munge/munge.sock
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=${DBD_PORT}
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=${DB_PORT}
StorageUser=root
StorageLoc=slurm_acct_db
PidFile=${T}/run/slurmdbd.pid
LogFile=${T}/log/slurmdbd.log
CONF
  chmod 600 "$T/etc/slurmdbd.conf"
  # AccountingStoragePass = munge socket for the slurmdbd connection (AuthInfo is NOT used there)
  ACCT="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=${DBD_PORT}
AccountingStoragePass=${T}/munge/munge.sock"
fi

cat > "$T/etc/slurm.conf" <<CONF
ClusterName=wdrotest
SlurmctldHost=${NODE}(127.0.0.1)
SlurmctldPort=${CTLD_PORT}
SlurmdPort=${SLURMD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=${T}/munge/munge.sock
StateSaveLocation=${T}/state
SlurmdSpoolDir=${T}/spool
SlurmctldPidFile=${T}/run/slurmctld.pid
SlurmdPidFile=${T}/run/slurmd.pid
SlurmctldLogFile=${T}/log/slurmctld.log
SlurmdLogFile=${T}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=${SLURM_SCHED_PARAMS:-batch_sched_delay=0,sched_min_interval=0}
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
${ACCT}
JobCompType=jobcomp/filetxt
JobCompLoc=${T}/log/jobcomp.txt
MinJobAge=3600
MaxArraySize=10001
MaxJobCount=100000
${EXTRA}
${SLURM_EXTRA_CONF:-}
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM_MB} State=UNKNOWN
PartitionName=debug Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$T/etc/slurm.conf"

if [ "$WITH_DBD" = 1 ]; then
  slurmdbd -D >"$T/log/slurmdbd.out" 2>&1 &
  echo $! > "$T/run/slurmdbd.fgpid"
  wait_for 60 sacctmgr -n list cluster || { echo "slurmdbd not answering"; tail "$T/log/slurmdbd.log"; exit 1; }
  sacctmgr -i add cluster wdrotest >/dev/null
fi

# -D: stay in foreground (we background them and keep the PIDs); -c -i: ignore old state
slurmctld -D -c -i >"$T/log/slurmctld.out" 2>&1 &
echo $! > "$T/run/slurmctld.fgpid"
slurmd -D -N "$NODE" >"$T/log/slurmd.out" 2>&1 &
echo $! > "$T/run/slurmd.fgpid"

if ! wait_for 30 bash -c '[ "$(timeout 5 sinfo -h -N -o %t)" = idle ]'; then
  echo "node not idle"; tail -n 20 "$T/log/slurmctld.log" "$T/log/slurmd.log"; exit 1
fi
