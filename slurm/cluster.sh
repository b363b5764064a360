#!/usr/bin/env bash
# A throw-away SLURM cluster on this machine, for the tests: munged, slurmctld and two slurmd nodes
# (n1, n2) in two partitions, `local` (the default) and `high` (preempts local: see slurm.conf.in),
# every file under one state directory. Needs root and Debian's slurmctld, slurmd, slurm-client and
# munge packages.
#
#   slurm/cluster.sh start  [STATE_DIR]   start (or report the running cluster); waits until both nodes are idle
#   slurm/cluster.sh stop   [STATE_DIR]   stop what `start` started and undo its network and /etc/hosts changes
#   slurm/cluster.sh status [STATE_DIR]   exit 0 when everything runs
#   slurm/cluster.sh env    [STATE_DIR]   `export SLURM_CONF=...` lines for the client commands
#   slurm/cluster.sh shape  [STATE_DIR]   a controller only (no slurmd) that declares GPU nodes of a
#                                         given shape, for `sbatch --test-only` of real recipes
#
# STATE_DIR defaults to $LAUNCHER_SLURM_DIR, then /tmp/launcher-slurm. Other settings:
#   LAUNCHER_SLURM_MODE=auto|netns|loopback  auto (default) tries network namespaces, then loopback
#   LAUNCHER_SLURM_TIMEOUT=30                seconds to wait for the nodes to become idle
#   LAUNCHER_SLURM_SUBNET=10.213.77          /24 for the bridge (.1) and the nodes (.11, .12)
#   LAUNCHER_SLURM_PORT=16817                slurmctld port; slurmd uses the next ones
#   LAUNCHER_SLURM_OWNER=...                 written to STATE_DIR/owner at start (the test fixture
#                                            stops a cluster left running by an interrupted session)
#   LAUNCHER_SLURM_SHAPE="64 128 2000000 8"  shape: nodes, CPUs, memory (MB) and GPUs per node
#
# netns mode gives every node its own network namespace, IP address and hostname (as on a real
# cluster), and its own view of /etc/hosts, where its own name resolves to a loopback address as on
# many real nodes: n1 as Debian writes it (127.0.1.1 n1), n2 as this kind of container does (127.0.0.1
# n2, after localhost), each with the other's real address. loopback mode runs both slurmd on
# 127.0.0.1 with distinct ports. Either way this machine's /etc/hosts gets n1 and n2 (removed at stop).
set -euo pipefail

NODES=(n1 n2)
CPUS_PER_NODE=2 # this machine's cores; the nodes oversubscribe them
GPUS_PER_NODE=8 # fake: gres files are symlinks to /dev/null, enough for --gpus-per-node=8
MEM_PER_NODE_MB=1024000 # advertised like a GPU node's, so `--mem=64G` fits; CR_CPU does not track memory
PARTITION=local
BRIDGE=lslurm0
NETNS_PREFIX=launcher-slurm-
SUBNET=${LAUNCHER_SLURM_SUBNET:-10.213.77}
CTLD_PORT=${LAUNCHER_SLURM_PORT:-16817}
TIMEOUT=${LAUNCHER_SLURM_TIMEOUT:-30}
MODE_WANTED=${LAUNCHER_SLURM_MODE:-auto}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export PATH="$PATH:/usr/sbin:/sbin"

die() {
  echo "cluster.sh: $*" >&2
  exit 1
}
note() { echo "cluster.sh: $*" >&2; }

usage() {
  sed -n '2,12s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
  exit 2
}

cmd=${1:-}
[[ -n $cmd ]] || usage
STATE_DIR=$(realpath -m "${2:-${LAUNCHER_SLURM_DIR:-/tmp/launcher-slurm}}")
[[ $STATE_DIR =~ ^/[A-Za-z0-9._/+-]+$ ]] || die "state directory '$STATE_DIR' must be a plain path (slurm.conf cannot quote)"
CONF=$STATE_DIR/slurm.conf
MUNGE_DIR=$STATE_DIR/munge         # key, pid, log, seed: 0700, owned by munge
MUNGE_RUN=$STATE_DIR/munge-run     # the socket: 0755, owned by munge
MUNGE_SOCKET=$MUNGE_RUN/munge.socket
PIDS=$STATE_DIR/pids               # PIDs of the processes we started, one file each
CREATED=$STATE_DIR/created         # network objects we created: "netns NAME" / "link NAME"
HOSTS_ADDED=$STATE_DIR/hosts.added # the exact lines we appended to /etc/hosts
MARKER="LAUNCHER_SLURM_CLUSTER=$STATE_DIR" # in the environment of slurmd and so of every slurmstepd

node_ip() { echo "$SUBNET.$((10 + $1))"; } # node index 1.. -> address
node_port() { echo "$((CTLD_PORT + 1 + $1))"; }

# --- processes ------------------------------------------------------------------------------------

# alive NAME COMM: the PID recorded for NAME runs (not a zombie) and is still the program we started
# (not a reused PID).
alive() {
  local pid stat
  pid=$(cat "$PIDS/$1.pid" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] && read -r stat 2>/dev/null <"/proc/$pid/stat" || return 1
  [[ $stat == "$pid ($2) "* && ${stat#*) } != Z* ]]
}

# stop_pids NAME:COMM...: TERM them all at once (each takes ~2 s to exit), KILL what is left after 5 s.
stop_pids() {
  local item i left
  for item in "$@"; do
    if alive "${item%%:*}" "${item#*:}"; then kill -TERM "$(cat "$PIDS/${item%%:*}.pid")" 2>/dev/null || true; fi
  done
  for ((i = 0; i <= 50; i++)); do
    left=()
    for item in "$@"; do alive "${item%%:*}" "${item#*:}" && left+=("$item"); done
    ((${#left[@]})) || break
    ((i < 50)) && sleep 0.1
  done
  for item in "${left[@]}"; do
    note "${item%%:*} ignored SIGTERM for 5 s; killing it"
    kill -KILL "$(cat "$PIDS/${item%%:*}.pid")" 2>/dev/null || true
  done
  for item in "$@"; do rm -f "$PIDS/${item%%:*}.pid"; done
}

# Processes our slurmd left behind: slurmstepd (they inherit MARKER) and job processes (they carry our
# SLURM_CONF and a job id). proctrack/linuxproc loses track of processes that re-parent to init.
leftover_pids() {
  local env_file pid
  for env_file in /proc/[0-9]*/environ; do
    pid=${env_file#/proc/}
    pid=${pid%/environ}
    [[ $pid == "$$" || $pid == "$BASHPID" ]] && continue
    if grep -qzxF "$MARKER" "$env_file" 2>/dev/null ||
      { grep -qzxF "SLURM_CONF=$CONF" "$env_file" 2>/dev/null && grep -qz '^SLURM_JOB_ID=' "$env_file" 2>/dev/null; }; then
      echo "$pid"
    fi
  done
}

mode() { cat "$STATE_DIR/mode" 2>/dev/null || echo none; }

# --- network namespaces and /etc/hosts ------------------------------------------------------------

setup_netns() {
  local i ns veth
  ip -4 addr show | grep -q "inet $SUBNET\." && { note "subnet $SUBNET.0/24 is already in use"; return 1; }
  ip link add "$BRIDGE" type bridge || return 1
  echo "link $BRIDGE" >>"$CREATED"
  ip addr add "$SUBNET.1/24" dev "$BRIDGE" && ip link set "$BRIDGE" up || return 1
  for i in "${!NODES[@]}"; do
    ns=$NETNS_PREFIX${NODES[i]}
    veth=lslurm-${NODES[i]}
    ip netns add "$ns" || return 1
    echo "netns $ns" >>"$CREATED"
    ip link add "$veth" type veth peer name "$veth-p" || return 1
    echo "link $veth" >>"$CREATED"
    ip link set "$veth-p" netns "$ns" &&
      ip link set "$veth" master "$BRIDGE" &&
      ip link set "$veth" up &&
      ip -n "$ns" addr add "$(node_ip $((i + 1)))/24" dev "$veth-p" &&
      ip -n "$ns" link set "$veth-p" up &&
      ip -n "$ns" link set lo up || return 1
  done
}

teardown_net() {
  local kind name
  [[ -f $CREATED ]] || return 0
  # Namespaces first (that frees their end of each veth), then links, newest first.
  while read -r kind name; do
    case $kind in
      netns) ip netns delete "$name" 2>/dev/null || note "could not delete netns $name" ;;
    esac
  done <"$CREATED"
  while read -r kind name; do
    case $kind in
      link) if ip link show "$name" >/dev/null 2>&1; then ip link delete "$name" || note "could not delete link $name"; fi ;;
    esac
  done < <(tac "$CREATED")
  rm -f "$CREATED"
}

# /etc/hosts may be a bind mount: rewrite it in place, never replace the file.
add_hosts() {
  local i name addr line
  for name in "${NODES[@]}"; do
    # A name already in /etc/hosts would win over ours (first match) and send torchrun elsewhere.
    if awk -v n="$name" '{sub(/#.*/, "")} {for (f = 2; f <= NF; f++) if ($f == n) found = 1} END {exit !found}' /etc/hosts; then
      note "/etc/hosts already names $name (not added by this cluster); remove that line"
      return 1
    fi
  done
  : >"$HOSTS_ADDED"
  if [[ -s /etc/hosts && -n $(tail -c 1 /etc/hosts) ]]; then
    echo >>/etc/hosts
    touch "$HOSTS_ADDED.newline" # remove_hosts takes this newline away again
  fi
  for i in "${!NODES[@]}"; do
    name=${NODES[i]}
    if [[ $(mode) == netns ]]; then addr=$(node_ip $((i + 1))); else addr=127.0.0.1; fi
    line="$addr $name # added by launcher slurm/cluster.sh for $STATE_DIR"
    echo "$line" >>"$HOSTS_ADDED"
    echo "$line" >>/etc/hosts
  done
}

remove_hosts() {
  local kept=$STATE_DIR/hosts.kept
  [[ -f $HOSTS_ADDED ]] || return 0
  grep -vxF -f "$HOSTS_ADDED" /etc/hosts >"$kept" || true
  if [[ -f $HOSTS_ADDED.newline && -s $kept && -z $(tail -c 1 "$kept") ]]; then truncate -s -1 "$kept"; fi
  cat "$kept" >/etc/hosts
  rm -f "$kept" "$HOSTS_ADDED" "$HOSTS_ADDED.newline"
}

# --- configuration --------------------------------------------------------------------------------

# STATE_DIR/hosts-NAME: /etc/hosts as node NAME sees it (bind-mounted over it in the node's own mount
# namespace): its own name on a loopback address, the other nodes on theirs.
write_node_hosts() {
  local i j file
  for i in "${!NODES[@]}"; do
    file=$STATE_DIR/hosts-${NODES[i]}
    echo "# /etc/hosts of test node ${NODES[i]} (slurm/cluster.sh): its own name resolves to a loopback address" >"$file"
    echo "127.0.0.1 localhost" >>"$file"
    if ((i == 0)); then echo "127.0.1.1 ${NODES[i]}" >>"$file"; else echo "127.0.0.1 ${NODES[i]}" >>"$file"; fi
    echo "::1 localhost ip6-localhost ip6-loopback" >>"$file"
    for j in "${!NODES[@]}"; do
      ((i == j)) || echo "$(node_ip $((j + 1))) ${NODES[j]}" >>"$file"
    done
  done
}

write_config() {
  local mode=$1 nodes="" i name ctld_addr text
  for i in "${!NODES[@]}"; do
    name=${NODES[i]}
    if [[ $mode == netns ]]; then
      nodes+="NodeName=$name NodeHostname=$name NodeAddr=$(node_ip $((i + 1))) Port=$((CTLD_PORT + 1))"
    else
      nodes+="NodeName=$name NodeHostname=localhost NodeAddr=127.0.0.1 Port=$(node_port $((i + 1)))"
    fi
    nodes+=" CPUs=$CPUS_PER_NODE RealMemory=$MEM_PER_NODE_MB Gres=gpu:$GPUS_PER_NODE State=UNKNOWN"$'\n'
  done
  if [[ $mode == netns ]]; then ctld_addr=$SUBNET.1; else ctld_addr=127.0.0.1; fi
  text=$(<"$HERE/slurm.conf.in")
  text=${text//@STATE_DIR@/$STATE_DIR}
  text=${text//@CTLD_HOST@/$(hostname -s)}
  text=${text//@CTLD_ADDR@/$ctld_addr}
  text=${text//@CTLD_PORT@/$CTLD_PORT}
  text=${text//@SLURMD_PORT@/$((CTLD_PORT + 1))}
  text=${text//@MUNGE_SOCKET@/$MUNGE_SOCKET}
  text=${text//@PARTITION@/$PARTITION}
  text=${text//@NODES@/${nodes%$'\n'}}
  printf '%s\n' "$text" >"$CONF"
  [[ $mode != netns ]] || write_node_hosts
  # gres.conf sits next to slurm.conf; File= must name device files, so point symlinks at /dev/null.
  mkdir -p "$STATE_DIR/dev"
  for ((i = 0; i < GPUS_PER_NODE; i++)); do ln -sfn /dev/null "$STATE_DIR/dev/gpu$i"; done
  echo "NodeName=${NODES[0]},${NODES[1]} Name=gpu File=$STATE_DIR/dev/gpu[0-$((GPUS_PER_NODE - 1))]" >"$STATE_DIR/gres.conf"
}

# --- start ----------------------------------------------------------------------------------------

start_munge() {
  alive munged munged && return 0
  mkdir -p "$MUNGE_DIR" "$MUNGE_RUN"
  rm -f "$MUNGE_DIR/munged.log"
  chown munge:munge "$MUNGE_DIR" "$MUNGE_RUN"
  chmod 0700 "$MUNGE_DIR"
  chmod 0755 "$MUNGE_RUN"
  if [[ ! -s $MUNGE_DIR/munge.key ]]; then
    dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none
    chown munge:munge "$MUNGE_DIR/munge.key"
    chmod 0600 "$MUNGE_DIR/munge.key"
  fi
  # munged forks and returns once its socket is ready (or prints why it is not).
  runuser -u munge -- munged --force --socket="$MUNGE_SOCKET" --key-file="$MUNGE_DIR/munge.key" \
    --pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed"
  cp "$MUNGE_DIR/munged.pid" "$PIDS/munged.pid"
}

# spawned NAME COMM: record $! as NAME once it has exec'd COMM (env, setsid, nsenter... come first).
spawned() {
  local pid=$! i
  disown "$pid" # no "Killed" job report from this shell when stop kills it
  echo "$pid" >"$PIDS/$1.pid"
  for ((i = 0; i < 100; i++)); do
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$2" ]] && return 0
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.02
  done
  note "$1 did not start"
  return 1
}

start_slurm() {
  local mode=$1 i name
  env "$MARKER" setsid slurmctld -D -c -f "$CONF" </dev/null >>"$STATE_DIR/log/slurmctld.out" 2>&1 &
  spawned slurmctld slurmctld || return 1
  for i in "${!NODES[@]}"; do
    name=${NODES[i]}
    if [[ $mode == netns ]]; then
      # nsenter --net only (`ip netns exec` remounts /sys and hides the cgroup mounts slurmd reads);
      # unshare --uts gives the node its own hostname, --mount its own /etc/hosts (private mounts:
      # nothing shows outside). Every step execs, so $! is slurmd's PID.
      # shellcheck disable=SC2016 # expanded by the inner shell
      env "$MARKER" setsid nsenter --net="/run/netns/$NETNS_PREFIX$name" unshare --uts --mount \
        sh -c 'hostname "$1" && mount --bind "$3" /etc/hosts && exec slurmd -D -N "$1" -f "$2"' \
        node "$name" "$CONF" "$STATE_DIR/hosts-$name" </dev/null >>"$STATE_DIR/log/slurmd-$name.out" 2>&1 &
    else
      env "$MARKER" setsid slurmd -D -N "$name" -f "$CONF" </dev/null >>"$STATE_DIR/log/slurmd-$name.out" 2>&1 &
    fi
    spawned "slurmd-$name" slurmd || return 1
  done
}

all_running() {
  local name
  alive munged munged && alive slurmctld slurmctld || return 1
  for name in "${NODES[@]}"; do alive "slurmd-$name" slurmd || return 1; done
}

# Nodes reach each other? (a bridge can be filtered by the host firewall, e.g. br_netfilter + DROP)
nodes_connected() {
  local i j
  for i in "${!NODES[@]}"; do
    for j in "${!NODES[@]}"; do
      [[ $i == "$j" ]] && continue
      # shellcheck disable=SC2016
      timeout 3 nsenter --net="/run/netns/$NETNS_PREFIX${NODES[i]}" \
        bash -c 'exec 3<>"/dev/tcp/$1/$2"' probe "$(node_ip $((j + 1)))" "$((CTLD_PORT + 1))" 2>/dev/null || return 1
    done
  done
}

# How many nodes are idle (sinfo -N lists a node once per partition it is in).
idle_nodes() {
  SLURM_CONF=$CONF sinfo -h -N -o '%N %T' 2>/dev/null | awk '$2 == "idle" && !seen[$1]++' | wc -l
}

# Wait until every node is idle; 1 with a reason on stderr if that does not happen in TIMEOUT s.
wait_idle() {
  local mode=$1 deadline=$((SECONDS + TIMEOUT)) name idle
  while ((SECONDS < deadline)); do
    alive slurmctld slurmctld || {
      note "slurmctld exited"
      touch "$STATE_DIR/no-fallback"
      return 1
    }
    for name in "${NODES[@]}"; do alive "slurmd-$name" slurmd || { note "slurmd $name exited"; return 1; }; done
    idle=$(idle_nodes)
    if ((idle == ${#NODES[@]})); then
      [[ $mode != netns ]] || nodes_connected || { note "the nodes cannot reach each other over $BRIDGE"; return 1; }
      return 0
    fi
    sleep 0.2
  done
  note "the nodes did not become idle within ${TIMEOUT} s:"
  SLURM_CONF=$CONF sinfo -N >&2 2>&1 || true
  return 1
}

# The end of each daemon's log (its .out when it died before opening the log), without plugin noise.
log_tails() {
  local name log
  for name in slurmctld "${NODES[@]/#/slurmd-}"; do
    log=$STATE_DIR/log/$name.log
    [[ -s $log ]] || log=$STATE_DIR/log/$name.out
    [[ -s $log ]] || continue
    echo "----- $log" >&2
    grep -v 'pmix\|MPI: Cannot create context' "$log" | tail -n 8 >&2
  done
  if ! alive munged munged && [[ -s $MUNGE_DIR/munged.log ]]; then
    echo "----- $MUNGE_DIR/munged.log" >&2
    tail -n 8 "$MUNGE_DIR/munged.log" >&2
  fi
}

# Stop the slurm daemons (and NAME:COMM... more) and their leftovers; undo the network and /etc/hosts.
stop_slurm() {
  local daemons=(slurmctld:slurmctld) name pids kind ns
  if alive slurmctld slurmctld && [[ -f $CONF ]]; then
    # Cancel jobs first so slurmstepd ends its tasks itself; give it a few seconds.
    pids=$(SLURM_CONF=$CONF timeout 5 squeue -h -o %A 2>/dev/null || true)
    if [[ -n $pids ]]; then
      # shellcheck disable=SC2086 # one argument per job id
      SLURM_CONF=$CONF timeout 5 scancel $pids 2>/dev/null || true
      for _ in {1..25}; do
        [[ -z $(SLURM_CONF=$CONF timeout 5 squeue -h -t running,completing -o %A 2>/dev/null) ]] && break
        sleep 0.2
      done
    fi
  fi
  for name in "${NODES[@]}"; do daemons+=("slurmd-$name:slurmd"); done
  stop_pids "${daemons[@]}" "$@"
  # Whatever is left in our namespaces, or carries our marker, was started by this cluster.
  pids=$(leftover_pids)
  if [[ -f $CREATED ]]; then
    while read -r kind ns; do
      [[ $kind == netns ]] && pids+=$'\n'$(ip netns pids "$ns" 2>/dev/null || true)
    done <"$CREATED"
  fi
  pids=$(sort -un <<<"$pids" | grep -v '^$' || true)
  if [[ -n $pids ]]; then
    note "killing leftover job processes: $(tr '\n' ' ' <<<"$pids")"
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
  fi
  remove_hosts
  teardown_net
  rm -f "$STATE_DIR/mode"
}

cmd_stop() {
  [[ -d $STATE_DIR ]] || return 0
  stop_slurm munged:munged
}

try_start() {
  local mode=$1
  : >"$CREATED"
  if [[ $mode == netns ]]; then
    setup_netns || { note "could not set up network namespaces"; return 1; }
  fi
  echo "$mode" >"$STATE_DIR/mode"
  write_config "$mode"
  add_hosts || { touch "$STATE_DIR/no-fallback"; return 1; }
  start_slurm "$mode" || return 1
  wait_idle "$mode"
}

start_failed() {
  local rc=$?
  ((rc == 0)) && return
  note "start failed; logs:"
  log_tails
  cmd_stop
  exit "$rc"
}

cmd_start() {
  local binary
  [[ $(id -u) == 0 ]] || die "must run as root (network namespaces, /etc/hosts, munged as user munge)"
  for binary in munged slurmctld slurmd sbatch sinfo; do
    command -v "$binary" >/dev/null || die "$binary not found: apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge"
  done
  id munge >/dev/null 2>&1 || die "no user munge (install the munge package)"
  case $MODE_WANTED in auto | netns | loopback) ;; *) die "LAUNCHER_SLURM_MODE=$MODE_WANTED is not auto, netns or loopback" ;; esac
  if all_running; then
    note "already running"
    cmd_status
    return 0
  fi
  cmd_stop # whatever a crashed earlier run left behind
  rm -rf "$STATE_DIR/log" "$STATE_DIR/spool" "$STATE_DIR/no-fallback"
  mkdir -p "$STATE_DIR"/{log,run,spool/ctld,pids}
  echo "${LAUNCHER_SLURM_OWNER:-hand}" >"$STATE_DIR/owner"
  trap start_failed EXIT
  start_munge
  if [[ $MODE_WANTED != loopback ]]; then
    if try_start netns; then
      trap - EXIT
      cmd_status
      return 0
    fi
    # A controller that died (port taken, bad config) or a name clash in /etc/hosts is not the
    # namespaces' fault: no fallback then.
    [[ $MODE_WANTED == auto && ! -f $STATE_DIR/no-fallback ]] || exit 1
    note "network namespaces did not work; falling back to loopback nodes. Logs of the netns attempt:"
    log_tails
    stop_slurm
    mkdir -p "$STATE_DIR/log/netns-attempt"
    mv "$STATE_DIR"/log/*.* "$STATE_DIR/log/netns-attempt/" 2>/dev/null || true
  fi
  try_start loopback
  trap - EXIT
  cmd_status
}

# --- shape: declared nodes, never started -------------------------------------------------------

# sbatch --test-only checks a request against the nodes slurmctld knows; nodes declared IDLE count
# without a slurmd (nothing can run on them, nothing is meant to).
cmd_shape() {
  local count cpus mem gpus text i deadline=$((SECONDS + TIMEOUT))
  [[ $(id -u) == 0 ]] || die "must run as root (munged as user munge)"
  read -r count cpus mem gpus <<<"${LAUNCHER_SLURM_SHAPE:-64 128 2000000 8}"
  [[ $count =~ ^[0-9]+$ && $cpus =~ ^[0-9]+$ && $mem =~ ^[0-9]+$ && $gpus =~ ^[0-9]+$ ]] ||
    die "LAUNCHER_SLURM_SHAPE='${LAUNCHER_SLURM_SHAPE:-}' is not 'NODES CPUS MEM_MB GPUS'"
  if [[ $(mode) == shape ]] && alive munged munged && alive slurmctld slurmctld; then
    note "already running"
    return 0
  fi
  cmd_stop
  rm -rf "$STATE_DIR/log" "$STATE_DIR/spool"
  mkdir -p "$STATE_DIR"/{log,run,spool/ctld,pids,dev}
  echo "${LAUNCHER_SLURM_OWNER:-hand}" >"$STATE_DIR/owner"
  echo shape >"$STATE_DIR/mode"
  trap start_failed EXIT
  start_munge
  text=$(<"$HERE/slurm.conf.in")
  text=${text//@STATE_DIR@/$STATE_DIR}
  text=${text//@CTLD_HOST@/$(hostname -s)}
  text=${text//@CTLD_ADDR@/127.0.0.1}
  text=${text//@CTLD_PORT@/$CTLD_PORT}
  text=${text//@SLURMD_PORT@/$((CTLD_PORT + 1))}
  text=${text//@MUNGE_SOCKET@/$MUNGE_SOCKET}
  text=${text//@PARTITION@/$PARTITION}
  text=${text//@NODES@/NodeName=g[1-$count] NodeHostname=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem Gres=gpu:$gpus State=IDLE}
  printf '%s\n' "$text" >"$CONF"
  for ((i = 0; i < gpus; i++)); do ln -sfn /dev/null "$STATE_DIR/dev/gpu$i"; done
  echo "NodeName=g[1-$count] Name=gpu File=$STATE_DIR/dev/gpu[0-$((gpus - 1))]" >"$STATE_DIR/gres.conf"
  env "$MARKER" setsid slurmctld -D -c -f "$CONF" </dev/null >>"$STATE_DIR/log/slurmctld.out" 2>&1 &
  spawned slurmctld slurmctld
  until [[ $(idle_nodes) == "$count" ]]; do
    ((SECONDS < deadline)) || die "the controller did not list $count idle nodes within ${TIMEOUT} s"
    sleep 0.2
  done
  trap - EXIT
  note "controller with $count declared nodes ($cpus CPUs, ${mem} MB, $gpus GPUs each) on port $CTLD_PORT"
}

cmd_status() {
  local name state rc=0 names=(munged slurmctld "${NODES[@]/#/slurmd-}")
  echo "state dir: $STATE_DIR"
  echo "mode:      $(mode)"
  [[ $(mode) == shape ]] && names=(munged slurmctld)
  for name in "${names[@]}"; do
    if alive "$name" "${name%%-*}"; then state="running (pid $(cat "$PIDS/$name.pid"))"; else state="not running" rc=1; fi
    printf '%-10s %s\n' "$name:" "$state"
  done
  if alive slurmctld slurmctld; then SLURM_CONF=$CONF timeout 5 sinfo -N -o '%N %P %T %c %G' || rc=1; fi
  return "$rc"
}

case $cmd in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  shape) cmd_shape ;;
  env)
    echo "export SLURM_CONF=$CONF"
    echo "export LAUNCHER_SLURM_DIR=$STATE_DIR"
    ;;
  *) usage ;;
esac
