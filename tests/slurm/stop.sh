#!/usr/bin/env bash
# Stop the cluster tests/slurm/start.sh DIR started: cancel its jobs, then stop exactly the daemons whose pid
# files are in DIR/run, newest first (each slurmd, slurmctld, slurmdbd, mariadbd, munged). Nothing else is touched.
set -uo pipefail

DIR=${1:?usage: tests/slurm/stop.sh DIR}
[ -d "$DIR/run" ] || exit 0
export SLURM_CONF=$DIR/etc/slurm.conf

alive() { [ -s "$DIR/run/$1.pid" ] && kill -0 "$(cat "$DIR/run/$1.pid")" 2>/dev/null; }

# Jobs first, while slurmctld and slurmd still run: their processes (slurmstepd and below) belong to slurmd.
if alive slurmctld; then
  timeout 10 scancel --quiet --full $(timeout 10 squeue -h -o %i 2>/dev/null) 2>/dev/null
  for _ in $(seq 150); do  # up to 30 s: KillWait is 30 s for a job that ignores SIGTERM
    [ -z "$(timeout 10 squeue -h -o %i 2>/dev/null)" ] && break
    sleep 0.2
  done
fi

slurmds=$(cd "$DIR/run" && ls slurmd-*.pid slurmd.pid 2>/dev/null | sed 's/\.pid$//')
for daemon in $slurmds slurmctld slurmdbd mariadbd munged; do
  alive "$daemon" || continue
  pid=$(cat "$DIR/run/$daemon.pid")
  kill -TERM "$pid"
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && { echo "[slurm-test] $daemon ($pid) ignored SIGTERM for 10 s: SIGKILL" >&2; kill -KILL "$pid"; }
  rm -f "$DIR/run/$daemon.pid"
done
exit 0
