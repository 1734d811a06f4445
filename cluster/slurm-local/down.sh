#!/usr/bin/env bash
# Stop the one-node SLURM that up.sh started: cancel jobs, stop slurmd, slurmctld and munged
# (only the daemons whose pids up.sh recorded). `--purge` also removes the packages and state.
set -uo pipefail
log() { echo "[slurm-local] $*"; }
if [ "$(id -u)" -ne 0 ]; then exec sudo -E bash "$0" "$@"; fi
state=/run/slurm-local
if command -v scancel >/dev/null && pgrep -x slurmctld >/dev/null; then
  scancel --full --quiet $(squeue -h -o %i 2>/dev/null) 2>/dev/null || true
fi
for d in slurmd slurmctld munged; do
  f="$state/$d.pid"
  if [ -s "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null; then
    kill "$(cat "$f")"
    for _ in $(seq 100); do kill -0 "$(cat "$f")" 2>/dev/null || break; sleep 0.1; done
    log "stopped $d"
  fi
  rm -f "$f"
done
if [ "${1:-}" = "--purge" ]; then
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 purge -y -qq \
    slurmctld slurmd slurm-client munge >/dev/null || true
  rm -rf /etc/slurm/slurm.conf /var/spool/slurmctld /var/spool/slurmd /var/log/slurm "$state"
  log "purged"
fi
exit 0
