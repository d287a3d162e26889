#!/bin/bash
# A one-node SLURM cluster on this machine, to try slurm/fit.sbatch (requeue, signals, srun) without a
# real cluster. Everything (munge key and socket, slurm.conf, state, spool, pid and log files) lives in
# one folder; nothing system-wide is written or started. Run it as root (sudo): slurmd must be root.
#
#   slurm/local-cluster.sh up     [DIR]            start munged, slurmctld, slurmd; print the export line
#   slurm/local-cluster.sh down   [DIR] [--purge]  stop the three daemons (--purge: also delete DIR)
#   slurm/local-cluster.sh status [DIR]            which daemons run, and sinfo
#   slurm/local-cluster.sh env    [DIR]            print `export SLURM_CONF=DIR/slurm.conf`
#
# DIR defaults to ${LDM_SLURM_DIR:-/tmp/ldm-slurm}. After `up`: eval "$(slurm/local-cluster.sh env)"
# Ports: $LDM_SLURM_CTLD_PORT / $LDM_SLURM_D_PORT (6817 / 6818). Requeue delay: $LDM_SLURM_REQUEUE_DELAY.
set -euo pipefail

cmd=${1:-}; shift || true
purge=0; dir=""
for a in "$@"; do
  case $a in --purge) purge=1 ;; -*) echo "unknown option $a" >&2; exit 2 ;; *) dir=$a ;; esac
done
dir=${dir:-${LDM_SLURM_DIR:-/tmp/ldm-slurm}}
dir=$(realpath -m "$dir")   # absolute: slurm.conf needs absolute paths
conf=$dir/slurm.conf
export SLURM_CONF=$conf
node=$(hostname -s)

die() { echo "local-cluster: $*" >&2; exit 1; }
export_line() { echo "export SLURM_CONF=$conf"; }
# pid of a daemon if its pid file names a live process, else nothing
pid_of() { local p; p=$(cat "$dir/$1.pid" 2>/dev/null) || return 1; [[ -n $p ]] && kill -0 "$p" 2>/dev/null && echo "$p"; }
node_state() { { timeout 10 sinfo -h -N -n "$node" -o '%T' 2>/dev/null || true; } | head -n1; }
is_up() { pid_of munged >/dev/null && pid_of slurmctld >/dev/null && pid_of slurmd >/dev/null; }
logs() { for f in munged slurmctld slurmd; do echo "--- $dir/$f.log"; tail -n 20 "$dir/$f.log" 2>/dev/null; done >&2; }

write_conf() {
  local cpus mem_kb mem
  cpus=$(nproc)
  mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
  mem=$(( mem_kb / 1024 * 95 / 100 - 512 ))  # MiB; slurmd drains a node that claims more than it has
  (( mem > 256 )) || mem=256
  local delay=${LDM_SLURM_REQUEUE_DELAY:-10}; (( delay >= 5 )) || delay=5  # below 5 slurm uses 120
  cat > "$conf" <<EOF
# Written by slurm/local-cluster.sh: one node ($node), all state under $dir.
ClusterName=ldm-local
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=${LDM_SLURM_CTLD_PORT:-6817}
SlurmdPort=${LDM_SLURM_D_PORT:-6818}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# AuthInfo (checked in slurm.conf(5) of 22.05): socket= points auth/munge and cred/munge at our munged.
# cred_expire= is the step-credential lifetime and ALSO how long a requeued job must wait before it may
# start again (EligibleTime = requeue + cred_expire + 1; default 120, minimum 5). That is the only
# requeue-delay knob; then the job waits for a scheduler pass: the backfill loop runs every bf_interval
# (default 30 s) and the full main loop every sched_interval (60 s), so make both short here.
AuthInfo=socket=$dir/munge.socket,cred_expire=$delay
SchedulerParameters=bf_interval=1,sched_interval=5
# No cgroups here: track processes by parent pid, no task binding, no accounting.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
# CPUs and memory are consumable; DefMemPerCPU keeps a job without --mem from taking all the memory,
# so two 1-CPU jobs run side by side and one 2-task job takes both CPUs.
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=$(( mem / cpus ))
JobRequeue=1
ReturnToService=2
KillWait=30
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=60
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
}

up() {
  if is_up; then export_line; return; fi
  [[ $(id -u) == 0 ]] || die "run as root (sudo): slurmd has to be root to start jobs"
  if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    echo "installing slurm-wlm and munge with apt-get" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null \
      || { DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
           DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null; } \
      || die "apt-get could not install slurm-wlm munge"
  fi
  # 0755: munged refuses a group/world-writable socket folder; others must reach the socket and conf.
  mkdir -p "$dir/state" "$dir/spool"; chmod 0755 "$dir"
  if [[ ! -s $dir/munge.key ]]; then
    mungekey --create --keyfile="$dir/munge.key" 2>/dev/null \
      || dd if=/dev/urandom of="$dir/munge.key" bs=1024 count=1 status=none
  fi
  chown "$(id -u):$(id -g)" "$dir/munge.key"; chmod 0400 "$dir/munge.key"
  write_conf

  if ! pid_of munged >/dev/null; then
    rm -f "$dir/munge.socket" "$dir/munge.socket.lock"
    local margs=(--socket="$dir/munge.socket" --pid-file="$dir/munged.pid" --log-file="$dir/munged.log"
                 --seed-file="$dir/munged.seed" --key-file="$dir/munge.key")
    # munged checks the owner/mode of every folder above its files; should it refuse (not seen as root
    # under /tmp on Debian 12), --force turns those checks into warnings.
    munged "${margs[@]}" 2>/dev/null || munged --force "${margs[@]}" || { logs; die "munged did not start"; }
  fi
  for _ in $(seq 50); do [[ -S $dir/munge.socket ]] && break; sleep 0.1; done
  pid_of slurmctld >/dev/null || slurmctld -f "$conf" || { logs; die "slurmctld did not start"; }
  pid_of slurmd >/dev/null || slurmd -f "$conf" -N "$node" || { logs; die "slurmd did not start"; }

  local state=""
  for i in $(seq 60); do
    state=$(node_state)
    # is_up too: with a port taken by another slurmctld, sinfo would answer for that one
    if is_up && [[ $state == idle* || $state == mixed* || $state == allocated* ]]; then export_line; return; fi
    (( i < 5 )) || is_up || { logs; die "a daemon exited (logs above, all under $dir; a port in use? see LDM_SLURM_*_PORT)"; }
    sleep 1
  done
  logs
  die "node $node is not idle after 60 s (sinfo says: '${state:-no answer}'); logs above, all under $dir"
}

# TERM, up to 10 s to exit, then KILL
stop() {
  local p; p=$(pid_of "$1") || { rm -f "$dir/$1.pid"; return 0; }
  kill -TERM "$p" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$p" 2>/dev/null && { echo "$1 ($p) ignored TERM for 10 s: KILL" >&2; kill -KILL "$p" || true; }
  echo "stopped $1 ($p)"; rm -f "$dir/$1.pid"
}

down() {
  if pid_of slurmctld >/dev/null; then
    local n; n=$(timeout 10 squeue -h -t running,completing 2>/dev/null | wc -l || true)
    (( n == 0 )) || echo "warning: $n running job(s) left alone; their processes outlive slurmd" >&2
  fi
  stop slurmd; stop slurmctld; stop munged
  if (( purge )); then rm -rf "$dir"; echo "removed $dir"; fi
}

status() {
  local d p
  for d in munged slurmctld slurmd; do
    if p=$(pid_of $d); then echo "$d: running (pid $p)"; else echo "$d: not running"; fi
  done
  if pid_of slurmctld >/dev/null; then timeout 10 sinfo || true; else echo "no slurmctld: run '$0 up'"; fi
}

case $cmd in
  up) up ;;
  down) down ;;
  status) status ;;
  env) export_line ;;
  *) sed -n '2,/^[^#]/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2; exit 2 ;;   # the header above
esac
