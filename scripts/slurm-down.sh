#!/usr/bin/env bash
# Stop what slurm-up.sh started: cancel jobs, stop daemons by their recorded PIDs,
# kill leftover job processes of THIS cluster only, then rm -rf $SLURM_TMP (unless KEEP_SLURM_TMP=1).
set -u
: "${SLURM_TMP:?}"
T=$SLURM_TMP
CONF=$T/etc/slurm.conf
stop() { # pidfile: SIGTERM, wait <=10 s, then SIGKILL
  [ -f "$1" ] || return 0
  local p; p=$(cat "$1")
  kill -TERM "$p" 2>/dev/null || return 0
  for _ in $(seq 1 200); do kill -0 "$p" 2>/dev/null || return 0; sleep 0.05; done
  echo "pid $p ignored SIGTERM, sending SIGKILL" >&2
  kill -KILL "$p" 2>/dev/null || true
}
# 1. cancel all jobs while the daemons are still up; wait (<=10 s) for an empty queue
if [ -f "$CONF" ] && SLURM_CONF=$CONF timeout 5 scontrol ping >/dev/null 2>&1; then
  SLURM_CONF=$CONF scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
  for _ in $(seq 1 100); do
    [ -z "$(SLURM_CONF=$CONF timeout 5 squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.1
  done
fi
# 2. daemons: slurmd, slurmctld, slurmdbd, mariadbd, munged (last)
for f in run/slurmd.fgpid run/slurmctld.fgpid run/slurmdbd.fgpid run/mariadbd.fgpid munge/munged.pid; do
  stop "$T/$f"
done
# 3. safety net (after a crash): slurmstepd/job processes of this cluster. slurmstepd inherits
#    slurmd's environment (SLURM_CONF=$CONF); job processes carry SLURM_CONF=$CONF + SLURM_JOB_ID.
for d in /proc/[0-9]*; do
  p=${d#/proc/}; [ "$p" = $$ ] && continue
  env=$( { tr '\0' '\n' < "$d/environ"; } 2>/dev/null ) || continue
  grep -qxF "SLURM_CONF=$CONF" <<<"$env" || continue
  cmd=$( { tr '\0' ' ' < "$d/cmdline"; } 2>/dev/null ) || continue
  if grep -q '^SLURM_JOB_ID=' <<<"$env" || [[ "$cmd" == slurmstepd:* ]]; then
    echo "killing leftover $p: $cmd" >&2
    kill -KILL "$p" 2>/dev/null || true
  fi
done
[ "${KEEP_SLURM_TMP:-0}" = 1 ] || rm -rf "$T"
