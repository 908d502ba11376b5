#!/usr/bin/env bash
# Builds and removes a closed island of network namespaces for the interceptor demo and
# its privileged end-to-end tests: N nodes joined by one switch, M pods behind each node.
# The island has no link and no route to the namespace this script runs in, and no
# default route anywhere, so a connection that escapes the mesh fails with "network
# unreachable" instead of leaving the machine. Run as root.
#
# Usage:
#   scripts/topology.sh up   --prefix P --nodes N --pods M --subnet K
#   scripts/topology.sh down --prefix P
#
#   --prefix P   names every namespace, cgroup and pin of this island: [a-z0-9]{1,8}
#   --nodes N    number of nodes, 1..9
#   --pods M     number of pods on each node, 1..9
#   --subnet K   second octet of the island's 10.K.0.0/16, 1..254
#
# `up` first runs `down` for the same prefix, so it also clears stale state and can run
# again. `down` succeeds when some or all of the island is already gone.
#
# Layout (tests/src/topology.rs computes the same names; change both together).
# Indexes i (node) and j (pod) start at 1.
#   P-sw         netns of the switch: bridge `sw`, one port `n<i>` per node and port `ca`
#   P-ca         netns of the CA service: veth `wire` on the switch, 10.K.0.100/24, no
#                other route, so only the nodes (on the same /24) reach it
#   P-n<i>       netns of node i: veth `wire` on the switch, 10.K.0.<i>/24,
#                ip_forward=1, route 10.K.<j>.0/24 via 10.K.0.<j> for every other node j;
#                bridge `pods` with 10.K.<i>.1/24, one port `p<j>` per pod
#   P-n<i>-p<j>  netns of pod j on node i: veth `eth0` on the node's `pods` bridge,
#                10.K.<i>.<10+j>/24, only route 10.K.0.0/16 via 10.K.<i>.1
#   <cgroup2>/interceptor/P-n<i>        cgroup of node i
#   <cgroup2>/interceptor/P-n<i>/p<j>   cgroup of pod j on node i
#   /sys/fs/bpf/interceptor/P-*         bpffs pins of the island, removed by `down` only
# `lo` is up in every namespace. Each veth pair is created with one end already inside
# each of its two namespaces, so no island interface ever appears in the caller's
# namespace and its short names cannot collide with another island's.
#
# Every process whose network namespace is one of P-* or whose cgroup is under
# interceptor/P-n* is killed by `down`.
set -euo pipefail

PREFIX_PATTERN='^[a-z0-9]{1,8}$'
BPFFS_PIN_ROOT=/sys/fs/bpf/interceptor
NETNS_DIR=/run/netns
# Last octet of the CA service's address 10.K.0.<octet>, above every node's.
CA_HOST_OCTET=100
# Seconds `down` waits for killed processes to leave their cgroups before rmdir.
CGROUP_DRAIN_TIMEOUT=10

log() { echo "topology: $*" >&2; }
die() { log "error: $*"; exit 1; }
usage() {
  sed -n '/^# Usage:/,/^# `up`/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
  exit 2
}

# Prints the mount point of the cgroup v2 hierarchy, read from /proc/self/mountinfo
# because it is /sys/fs/cgroup on some machines and /sys/fs/cgroup/unified on others.
cgroup2_mount() {
  local line mount_point
  # Field 5 is the mount point, and the filesystem type follows the " - " separator.
  line=$(awk '{ for (f = 7; f <= NF; f++) if ($f == "-") break; if ($(f + 1) == "cgroup2") { print $5; exit } }' /proc/self/mountinfo)
  [[ -n $line ]] || return 1
  # mountinfo escapes space, tab, newline and backslash as octal (\040).
  printf -v mount_point '%b' "$line"
  echo "$mount_point"
}

# Writes VALUE to /proc/sys/KEY inside netns NS. /proc/sys/net shows the namespace of
# the process that opens it, so `ip netns exec` is enough here.
netns_sysctl() {
  local ns=$1 key=$2 value=$3
  ip netns exec "$ns" sh -c "echo $value > /proc/sys/${key//.//}"
}

# Kills every process in cgroup DIR and below: cgroup.kill (Linux 5.14+) where present,
# else SIGKILL to each pid listed in cgroup.procs of DIR and its descendants.
kill_cgroup_tree() {
  local dir=$1 procs pid
  [[ -d $dir ]] || return 0
  if [[ -e $dir/cgroup.kill ]]; then
    echo 1 > "$dir/cgroup.kill" 2>/dev/null || true
    return 0
  fi
  while IFS= read -r procs; do
    while IFS= read -r pid; do
      kill -KILL "$pid" 2>/dev/null || true
    done < "$procs"
  done < <(find "$dir" -name cgroup.procs 2>/dev/null)
}

# Removes cgroup DIR and its descendants, deepest first, waiting for killed processes
# to leave: rmdir fails with EBUSY while a cgroup still has a member.
remove_cgroup_tree() {
  local dir=$1 deadline sub
  [[ -d $dir ]] || return 0
  deadline=$((SECONDS + CGROUP_DRAIN_TIMEOUT))
  while IFS= read -r sub; do
    until rmdir "$sub" 2>/dev/null || [[ ! -d $sub ]]; do
      if ((SECONDS >= deadline)); then
        log "warning: cgroup $sub still has processes after ${CGROUP_DRAIN_TIMEOUT}s, leaving it"
        break
      fi
      sleep 0.1
    done
  done < <(find "$dir" -depth -mindepth 0 -type d 2>/dev/null)
}

down() {
  local prefix=$1 cgroup_root ns pid node_cgroup
  local -a namespaces=()

  if [[ -d $NETNS_DIR ]]; then
    for ns in "$NETNS_DIR/$prefix"-*; do
      if [[ -e $ns ]]; then namespaces+=("${ns##*/}"); fi
    done
  fi

  # Kill first: a process left inside a namespace keeps it alive after `ip netns delete`
  # and a process left in a cgroup makes rmdir fail.
  for ns in "${namespaces[@]}"; do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do
      kill -KILL "$pid" 2>/dev/null || true
    done
  done
  cgroup_root=$(cgroup2_mount) || cgroup_root=
  if [[ -n $cgroup_root ]]; then
    for node_cgroup in "$cgroup_root/interceptor/$prefix"-n*; do
      if [[ -d $node_cgroup ]]; then kill_cgroup_tree "$node_cgroup"; fi
    done
  fi

  for ns in "${namespaces[@]}"; do
    ip netns delete "$ns" 2>/dev/null || {
      # Left over from an interrupted `ip netns add`: the file exists but is no mount.
      umount "$NETNS_DIR/$ns" 2>/dev/null || true
      rm -f "$NETNS_DIR/$ns"
    }
  done

  if [[ -n $cgroup_root ]]; then
    for node_cgroup in "$cgroup_root/interceptor/$prefix"-n*; do
      if [[ -d $node_cgroup ]]; then remove_cgroup_tree "$node_cgroup"; fi
    done
    # The parent is shared by every island, so rmdir fails while another island uses it.
    rmdir "$cgroup_root/interceptor" 2>/dev/null || true
  fi

  if [[ $(stat -f -c %T /sys/fs/bpf 2>/dev/null) == bpf_fs ]]; then
    rm -rf "$BPFFS_PIN_ROOT/$prefix"-*
    rmdir "$BPFFS_PIN_ROOT" 2>/dev/null || true
  fi
}

# Creates DIR under the shared interceptor/ cgroup. A concurrent `down` of another
# island may remove an empty interceptor/ between mkdir calls, so try twice.
make_cgroup() {
  local dir=$1
  mkdir -p "$dir" 2>/dev/null || mkdir -p "$dir" || die "cannot create cgroup $dir"
}

up() {
  local prefix=$1 nodes=$2 pods=$3 subnet=$4
  local sw="$prefix-sw" node pod i j k cgroup_root

  cgroup_root=$(cgroup2_mount) || die "no cgroup2 mount in /proc/self/mountinfo"
  down "$prefix"

  ip netns add "$sw"
  ip -n "$sw" link set lo up
  ip -n "$sw" link add sw type bridge forward_delay 0
  ip -n "$sw" link set sw up

  ip netns add "$prefix-ca"
  ip -n "$prefix-ca" link set lo up
  ip -n "$sw" link add ca type veth peer name wire netns "$prefix-ca"
  ip -n "$sw" link set ca master sw up
  ip -n "$prefix-ca" addr add "10.$subnet.0.$CA_HOST_OCTET/24" dev wire
  ip -n "$prefix-ca" link set wire up

  for ((i = 1; i <= nodes; i++)); do
    node="$prefix-n$i"
    ip netns add "$node"
    ip -n "$node" link set lo up
    ip -n "$sw" link add "n$i" type veth peer name wire netns "$node"
    ip -n "$sw" link set "n$i" master sw up
    ip -n "$node" addr add "10.$subnet.0.$i/24" dev wire
    ip -n "$node" link set wire up
    netns_sysctl "$node" net.ipv4.ip_forward 1

    ip -n "$node" link add pods type bridge forward_delay 0
    ip -n "$node" addr add "10.$subnet.$i.1/24" dev pods
    ip -n "$node" link set pods up
    make_cgroup "$cgroup_root/interceptor/$node"

    for ((j = 1; j <= pods; j++)); do
      pod="$node-p$j"
      ip netns add "$pod"
      ip -n "$pod" link set lo up
      ip -n "$node" link add "p$j" type veth peer name eth0 netns "$pod"
      ip -n "$node" link set "p$j" master pods up
      ip -n "$pod" addr add "10.$subnet.$i.$((10 + j))/24" dev eth0
      ip -n "$pod" link set eth0 up
      ip -n "$pod" route add "10.$subnet.0.0/16" via "10.$subnet.$i.1"
      make_cgroup "$cgroup_root/interceptor/$node/p$j"
    done
  done

  # Routes to the other nodes' pod subnets need every node's `wire` address in place.
  for ((i = 1; i <= nodes; i++)); do
    for ((k = 1; k <= nodes; k++)); do
      ((k == i)) && continue
      ip -n "$prefix-n$i" route add "10.$subnet.$k.0/24" via "10.$subnet.0.$k"
    done
  done

  log "island $prefix is up: $nodes node(s) with $pods pod(s) each in 10.$subnet.0.0/16"
}

remove_after_failure() {
  local status=$? prefix=$1
  ((status == 0)) && return 0
  log "error: up failed (exit status $status), removing the partial island $prefix"
  down "$prefix" || true
  exit "$status"
}

# Checks that VALUE is a whole number in MIN..MAX, naming FLAG in the error.
check_range() {
  local flag=$1 value=$2 min=$3 max=$4
  # At most 3 digits, so the arithmetic below cannot overflow.
  [[ $value =~ ^[0-9]{1,3}$ ]] && ((10#$value >= min && 10#$value <= max)) ||
    die "invalid $flag '$value': expected a whole number from $min to $max"
}

main() {
  (($# >= 1)) || usage
  local command=$1 prefix= nodes= pods= subnet=
  shift
  while (($#)); do
    (($# >= 2)) || die "option $1 needs a value"
    case $1 in
      --prefix) prefix=$2 ;;
      --nodes) nodes=$2 ;;
      --pods) pods=$2 ;;
      --subnet) subnet=$2 ;;
      *) die "unknown option '$1' (see the usage with no arguments)" ;;
    esac
    shift 2
  done

  [[ -n $prefix ]] || die "missing --prefix"
  [[ $prefix =~ $PREFIX_PATTERN ]] ||
    die "invalid --prefix '$prefix': expected 1 to 8 characters from a-z and 0-9"
  [[ $(id -u) == 0 ]] || die "must run as root (it creates network namespaces and cgroups)"

  case $command in
    up)
      [[ -n $nodes && -n $pods && -n $subnet ]] || die "up needs --nodes, --pods and --subnet"
      check_range --nodes "$nodes" 1 9
      check_range --pods "$pods" 1 9
      check_range --subnet "$subnet" 1 254
      # A failed step exits through `set -e`, so remove the partial island on the way out.
      # The prefix is expanded now because main's locals are gone when the trap runs,
      # and the check above keeps it to [a-z0-9].
      trap "remove_after_failure $prefix" EXIT
      up "$prefix" "$((10#$nodes))" "$((10#$pods))" "$((10#$subnet))"
      trap - EXIT
      ;;
    down)
      [[ -z $nodes && -z $pods && -z $subnet ]] || die "down takes only --prefix"
      down "$prefix"
      ;;
    *) die "unknown command '$command': expected up or down" ;;
  esac
}

main "$@"
