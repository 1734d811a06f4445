#!/usr/bin/env bash
# Bring up a one-node SLURM on this machine (munge, slurmctld, slurmd), idempotently, for the
# SLURM test and for trying `deberta submit` without a cluster. The recipe and the pitfalls it
# avoids are in ../shared/docs/cluster-notes.md (the numbers below refer to its pitfall list).
#
#   bash cluster/slurm-local/up.sh      # ~15 s the first time (apt), 0.1 s when already up
#   bash cluster/slurm-local/down.sh    # stops what up.sh started (--purge: packages and state too)
#
# Needs root (or sudo) and Debian's apt. Open MPI with `MpiDefault=pmix` (srun --mpi=pmix).
set -euo pipefail
log() { echo "[slurm-local] $*"; }
if [ "$(id -u)" -ne 0 ]; then exec sudo -E bash "$0" "$@"; fi

node="$(hostname -s)"
conf=/etc/slurm/slurm.conf
state=/run/slurm-local            # pids of the daemons this script started
# Tasks may outnumber cores: advertise 8 CPUs and let slurmd accept it (pitfalls 1 and 2).
cpus="${SLURM_LOCAL_CPUS:-8}"

# libpmix2 before slurmd starts, or srun --mpi=pmix times out (pitfalls 5 and 6).
pkgs=(munge slurmctld slurmd slurm-client openmpi-bin libopenmpi-dev libpmix2)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
    --no-install-recommends "${missing[@]}" >/dev/null
fi

# hydra/pmix reach the node by name (pitfall 20).
getent hosts "$node" >/dev/null || echo "127.0.0.1 $node" >> /etc/hosts

mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm "$state"
new_conf="$(mktemp)"
cat > "$new_conf" <<CONF
# Written by cluster/slurm-local/up.sh: a one-node SLURM for tests (see cluster-notes.md).
ClusterName=local
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
MpiDefault=pmix
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
KillOnBadExit=1
EnforcePartLimits=ALL
MailProg=/bin/true
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
MinJobAge=300
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
CONF
changed=0
if ! cmp -s "$new_conf" "$conf"; then
  install -m 0644 "$new_conf" "$conf"
  changed=1
  log "wrote $conf (node $node, $cpus CPUs, MpiDefault=pmix)"
fi
rm -f "$new_conf"

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# The package does not start munged (no systemd here; pitfall 3).
if ! pgrep -x munged >/dev/null; then
  install -d -o munge -g munge -m 0755 /run/munge
  runuser -u munge -- /usr/sbin/munged
  pgrep -xo munged > "$state/munged.pid"
  log "started munged"
fi

if [ "$changed" = 1 ]; then
  # A new config (or MpiDefault) needs both daemons restarted (pitfall 6).
  for d in slurmd slurmctld; do
    if alive "$state/$d.pid"; then kill "$(cat "$state/$d.pid")"; fi
  done
  for _ in $(seq 100); do pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || break; sleep 0.1; done
fi
if ! pgrep -x slurmctld >/dev/null; then
  slurmctld -c          # -c: a clean state, which also clears an old DRAIN (pitfall 2)
  log "started slurmctld"
fi
if ! pgrep -x slurmd >/dev/null; then
  slurmd -N "$node"
  log "started slurmd"
fi

for _ in $(seq 300); do
  if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
    log "up: node $node idle ($(sinfo -h -o '%c CPUs, partition %P'))"
    exit 0
  fi
  # A node that came up drained (e.g. from an old state) is resumed once.
  if sinfo -h -o %T 2>/dev/null | grep -qE 'drain|down|inval'; then
    scontrol update nodename="$node" state=resume 2>/dev/null || true
  fi
  sleep 0.2
done
log "error: node $node did not become idle in 60 s:"
sinfo -N -l >&2 || true
tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
exit 1
