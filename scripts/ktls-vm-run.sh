#!/usr/bin/env bash
# Runs one command as root inside a throw-away QEMU guest that boots Debian's stock
# kernel, for the tests that need what the host kernel may lack. That kernel has kernel
# TLS (`tls.ko` in linux-image-amd64) besides the BPF program types, cgroup2 and network
# namespaces that the other tests use. Needs root on a Debian 12 host.
#
# Usage:
#   scripts/ktls-vm-run.sh COMMAND [ARG...]
#   scripts/ktls-vm-run.sh --prepare
#
#   --prepare   only install QEMU, download the kernel and busybox and build the
#               initramfs into the cache, then exit (`scripts/setup.sh --ktls-guest`)
#
# The guest sees this host's whole filesystem: `/` is shared read-only over 9p, under a
# tmpfs overlay, so the command may write anywhere but its writes are lost at exit
# (see KTLS_VM_RW). The command runs as root in the caller's working directory with the
# caller's exported environment, stdin is /dev/null, and the guest has its own /run,
# cgroup2 at /sys/fs/cgroup, bpffs at /sys/fs/bpf and network namespaces.
#
# Exit status: the command's; 124 when the guest timed out; 125 when the VM could not be
# prepared or did not report a status.
# Output: the command's stdout and stderr, merged, byte for byte on stdout. They leave
# the guest through a virtio serial port backed by a file, because QEMU's stdio chardev
# stalls the guest when stdin is not a terminal, as in CI. Kernel messages of level
# error and worse, and this script's own messages, go to stderr.
#
# Environment:
#   KTLS_VM_TIMEOUT     seconds before the guest is killed (default 1800)
#   KTLS_VM_MEM         guest memory in MiB (default 2048); the tmpfs overlay takes
#                       at most half of it
#   KTLS_VM_SMP         guest CPUs (default: the host's CPU count, at most 4)
#   KTLS_VM_CACHE       cache directory (default /var/cache/interceptor-ktls-vm)
#   KTLS_VM_KERNEL_PKG  kernel package, e.g. linux-image-6.1.0-37-amd64 (default: the
#                       one linux-image-amd64 depends on); read when the cache is empty
#   KTLS_VM_RW          colon-separated host directories that the guest mounts
#                       read-write at the same path, so writes there reach the host
#   KTLS_VM_ACCEL       QEMU accelerator (default tcg; kvm where the host allows it)
#   KTLS_VM_QEMU_ARGS   extra QEMU arguments, split on whitespace
#   KTLS_VM_KEEP=1      keep the run directory (command script, dmesg, exit status)
#   KTLS_VM_DMESG=1     print the guest's dmesg to stderr after the run
#
# Cache (about 420 MB): `root/` holds the unpacked kernel package, `vmlinux` the kernel
# decompressed once for a faster boot, `bb/` busybox, and `initramfs.cpio` the initramfs,
# rebuilt whenever this script is newer. Only QEMU is installed into the system; the
# kernel package and busybox are downloaded with `apt-get download` and unpacked.
#
# Under TCG (no KVM), the guest took 4 to 8 s from start to the command on a 2-CPU host,
# and it runs code roughly 10 times slower than the host: use it for functional tests,
# not for timings.
set -euo pipefail

SELF=$(realpath "${BASH_SOURCE[0]}")
CACHE=${KTLS_VM_CACHE:-/var/cache/interceptor-ktls-vm}
MEM_MIB=${KTLS_VM_MEM:-2048}
CPUS=${KTLS_VM_SMP:-$(($(nproc) < 4 ? $(nproc) : 4))}
TIMEOUT_SECONDS=${KTLS_VM_TIMEOUT:-1800}
ACCEL=${KTLS_VM_ACCEL:-tcg}
APT=(apt-get -o DPkg::Lock::Timeout=600 -o APT::Sandbox::User=root)
# Exit status when the VM could not be prepared or did not report the command's status.
EXIT_VM_FAILED=125
export DEBIAN_FRONTEND=noninteractive

log() { echo "ktls-vm: $*" >&2; }
die() { log "error: $*"; exit "$EXIT_VM_FAILED"; }
usage() {
  sed -n '/^# Usage:/,/^# The guest sees/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
  exit 2
}

# Modules that the initramfs loads itself, each after its modules.dep dependencies:
# first those needed to mount the host's root, then those the tests use (kTLS with its
# AEAD ciphers, veth and bridge for the topology). The kernel can load any other module
# on demand through busybox modprobe, but under TCG each such load takes about 2 s.
EARLY_MODULES="virtio_pci virtio_console 9pnet_virtio 9p overlay
tls gcm ccm aesni_intel ghash_clmulni_intel chacha20poly1305 veth bridge"

apt_updated=
# Runs `apt-get update` once per run; fails when it already ran, so callers retry once.
apt_update_once() {
  [[ -z $apt_updated ]] || return 1
  apt_updated=1
  log "running apt-get update"
  "${APT[@]}" update >&2
}

# Downloads package $1 into the working directory, retrying once after an apt-get
# update in case the package lists name a version the mirror no longer has.
apt_download() {
  "${APT[@]}" download "$1" >&2 ||
    { apt_update_once && "${APT[@]}" download "$1" >&2; } ||
    die "apt-get download $1 failed"
}

# Prints the URI of the first apt source that serves suite $1, from one-line `.list`
# files and deb822 `.sources` files.
mirror_of_suite() {
  local suite=$1 file
  local -a files=()
  # awk stops at the first file it cannot open, so pass only those that exist.
  for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    if [[ -f $file ]]; then files+=("$file"); fi
  done
  ((${#files[@]})) || return 0
  awk -v suite="$suite" '
    /^URIs:/ { uri = $2 }
    /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite) { print uri; exit } }
    /^deb / && $2 !~ /^\[/ && $3 == suite { print $2; exit }
    /^deb \[/ { for (i = 2; i <= NF; i++) if ($i ~ /\]$/) break; if ($(i + 2) == suite) { print $(i + 1); exit } }
  ' "${files[@]}"
}

# Installs qemu-system-x86. A qemu-utils from <codename>-backports (10.x on the
# project's machines) declares Breaks: qemu-system-common (<< 8), so bookworm's
# qemu-system-x86 7.2 would remove it; take qemu-system-x86 from the same backports
# suite then, through a temporary source list that leaves the system's apt
# configuration untouched.
install_qemu() {
  local utils codename mirror lists
  utils=$(dpkg-query -W -f '${Status} ${Version}' qemu-utils 2>/dev/null || true)
  if [[ $utils != "install ok installed"*bpo* ]]; then
    log "installing qemu-system-x86"
    "${APT[@]}" install -y --no-install-recommends qemu-system-x86 >&2 ||
      { apt_update_once && "${APT[@]}" install -y --no-install-recommends qemu-system-x86 >&2; } ||
      die "cannot install qemu-system-x86 with apt-get"
    return 0
  fi

  codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
  mirror=$(mirror_of_suite "$codename")
  [[ -n $mirror ]] || die "no apt source serves $codename, so $codename-backports cannot be derived from it"
  lists=$(mktemp -d)
  mkdir -p "$lists/parts" "$lists/state/partial"
  cp /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources "$lists/parts/" 2>/dev/null || true
  if [[ -s /etc/apt/sources.list ]]; then cp /etc/apt/sources.list "$lists/parts/system.list"; fi
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $codename-backports main" \
    > "$lists/parts/zz-backports.list"
  local -a temporary_sources=(-o Dir::Etc::sourcelist=/dev/null -o "Dir::Etc::sourceparts=$lists/parts"
    -o "Dir::State::lists=$lists/state")
  log "installing qemu-system-x86 from $codename-backports, to keep qemu-utils ${utils##* }"
  if ! "${APT[@]}" "${temporary_sources[@]}" update >&2 ||
     ! "${APT[@]}" "${temporary_sources[@]}" install -y --no-install-recommends \
         -t "$codename-backports" qemu-system-x86 >&2; then
    rm -rf "$lists"
    die "cannot install qemu-system-x86 from $codename-backports ($mirror)"
  fi
  rm -rf "$lists"
}

# Fills the cache: QEMU, busybox, the kernel and the initramfs, each only when missing
# or, for the initramfs, older than this script. Runs in a subshell (it changes
# directory) under a lock, so parallel first runs prepare once and the others wait.
prepare() {
  command -v qemu-system-x86_64 >/dev/null || install_qemu
  command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found after installing qemu-system-x86"
  mkdir -p "$CACHE"
  cd "$CACHE"
  exec {lock_fd}>.lock
  flock "$lock_fd"
  if [[ ! -x bb/bin/busybox ]]; then
    rm -rf bb ./busybox-static_*.deb
    apt_download busybox-static
    dpkg-deb -x ./busybox-static_*.deb bb
    rm -f ./busybox-static_*.deb
  fi
  if [[ ! -s kernel-release ]]; then fetch_kernel; fi
  if [[ -s initramfs.cpio && initramfs.cpio -nt $SELF ]]; then return 0; fi
  build_initramfs
}

# Downloads and unpacks the kernel package and writes its release to `kernel-release`.
fetch_kernel() {
  local package=${KTLS_VM_KERNEL_PKG:-} release offset
  # linux-image-amd64 is a metapackage whose Depends names the current ABI package,
  # linux-image-6.1.0-NN-amd64 on bookworm.
  if [[ -z $package ]]; then package=$(kernel_package_of_metapackage); fi
  if [[ -z $package ]] && apt_update_once; then package=$(kernel_package_of_metapackage); fi
  [[ -n $package ]] || die "cannot find the package that linux-image-amd64 depends on"
  log "downloading $package into $CACHE/root (not installed)"
  rm -rf root vmlinux ./linux-image-*.deb
  apt_download "$package"
  dpkg-deb -x ./"$package"_*.deb root
  rm -f ./linux-image-*.deb
  release=${package#linux-image-}
  [[ -d root/lib/modules/$release ]] || die "$package has no modules for release $release"
  # The package ships no modules.dep; `depmod` runs at install time, which this skips.
  bb/bin/busybox depmod -b root "$release"

  # Decompress the bzImage once: under TCG un-xz-ing it takes about 3 s of every boot,
  # while QEMU boots the uncompressed ELF vmlinux directly through its PVH entry point
  # (Debian builds with CONFIG_PVH=y).
  rm -f vmlinux.partial
  offset=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "root/boot/vmlinuz-$release" | head -1 | cut -d: -f1)
  if [[ -n $offset ]]; then
    # xz stops after the first stream, so tail may die of SIGPIPE; the ELF check decides.
    tail -c +$((offset + 1)) "root/boot/vmlinuz-$release" | xz -dc --single-stream > vmlinux.partial 2>/dev/null || true
  fi
  if [[ -s vmlinux.partial && $(head -c 4 vmlinux.partial | od -An -c | tr -d ' ') == 177ELF ]]; then
    mv vmlinux.partial vmlinux
  else
    rm -f vmlinux.partial
    log "could not decompress vmlinux, so every boot decompresses the bzImage (about 3 s slower)"
  fi
  echo "$release" > kernel-release
}

kernel_package_of_metapackage() {
  apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }'
}

# Builds `initramfs.cpio`: busybox, the early modules and the init script below.
build_initramfs() {
  local release staging module line file i
  local -a dependencies load_order=()
  release=$(cat kernel-release)
  staging=$(mktemp -d)
  mkdir -p "$staging"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,lower,upper,host,share,modules,lib/modules/"$release"}
  cp bb/bin/busybox "$staging/bin/busybox"

  # modules.dep lists a module's dependencies nearest first, so load them in reverse.
  for module in $EARLY_MODULES; do
    line=$(grep -E "/${module//_/[-_]}\.ko(\.xz)?:" "root/lib/modules/$release/modules.dep") ||
      die "module $module not found in kernel $release"
    read -ra dependencies <<< "${line#*:}"
    for ((i = ${#dependencies[@]} - 1; i >= 0; i--)); do load_order+=("${dependencies[i]}"); done
    load_order+=("${line%%:*}")
  done
  for file in "${load_order[@]}"; do
    if grep -qxF "$file" "$staging/modules/order" 2>/dev/null; then continue; fi
    cp "root/lib/modules/$release/$file" "$staging/modules/"
    echo "$file" >> "$staging/modules/order"
  done

  cat > "$staging/init" <<'EOF'
#!/bin/busybox sh
# Init of the ktls-vm guest: mounts the host's root under a tmpfs overlay, runs the
# command from /share/command.sh in it, stores the exit status and powers off.
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
fail() { echo "ktls-vm: $*"; echo 125 > /share/status 2>/dev/null; sync; poweroff -f; }
for module in $(cat /modules/order); do
  insmod "/modules/${module##*/}" || echo "ktls-vm: insmod $module failed"
done

options=trans=virtio,version=9p2000.L,msize=262144
mount -t 9p -o "$options,ro,cache=loose" hostroot /lower || fail "cannot mount the host root"
mount -t 9p -o "$options,cache=none" run /share || fail "cannot mount the run directory"
. /share/config        # sets RUN_DIR, MODULES_DIR and RW_DIRS, all host paths
release=$(uname -r)
# The kernel runs /proc/sys/kernel/modprobe in this root for on-demand loads
# (tcp-ulp-tls, crypto algorithms), so give it the package's whole module tree.
mount --bind "/lower$MODULES_DIR" "/lib/modules/$release" || fail "cannot bind the modules"
echo /sbin/modprobe > /proc/sys/kernel/modprobe

# A writable view of the host's root: the read-only 9p mount under a tmpfs.
mount -t tmpfs -o size=50% tmpfs /upper
mkdir -p /upper/data /upper/work
mount -t overlay -o lowerdir=/lower,upperdir=/upper/data,workdir=/upper/work overlay /host ||
  fail "cannot mount the overlay"
root=/host
mount -t proc proc $root/proc
mount -t sysfs sys $root/sys
mount -t devtmpfs dev $root/dev
# devtmpfs lacks the links that udev adds; bash's process substitution needs /dev/fd.
ln -s /proc/self/fd $root/dev/fd
ln -s /proc/self/fd/0 $root/dev/stdin
ln -s /proc/self/fd/1 $root/dev/stdout
ln -s /proc/self/fd/2 $root/dev/stderr
mkdir -p $root/dev/pts $root/dev/shm
mount -t devpts devpts $root/dev/pts
mount -t tmpfs tmpfs $root/dev/shm
mount -t tmpfs tmpfs $root/run
mount -t cgroup2 cgroup2 $root/sys/fs/cgroup || fail "cannot mount cgroup2"
mount -t bpf bpf $root/sys/fs/bpf || fail "cannot mount the bpf filesystem"
mount -t debugfs debugfs $root/sys/kernel/debug 2>/dev/null
mount -t tracefs tracefs $root/sys/kernel/tracing 2>/dev/null
mkdir -p "$root/lib/modules/$release"
mount --bind "/lib/modules/$release" "$root/lib/modules/$release"
mkdir -p "$root$RUN_DIR"
mount --bind /share "$root$RUN_DIR"
index=0
for dir in $RW_DIRS; do
  mkdir -p "$root$dir"
  mount -t 9p -o "$options,cache=none" "rw$index" "$root$dir" || fail "cannot mount $dir read-write"
  index=$((index + 1))
done
ip link set lo up
hostname ktls-vm
# The module tree has only the modules.dep that busybox depmod wrote, and the host may
# have no kmod tools at all, so busybox's modprobe, lsmod, insmod and rmmod come first
# in the command's PATH.
mkdir -p $root/run/ktls-vm/bin
cp /bin/busybox $root/run/ktls-vm/bin/
for applet in modprobe insmod rmmod lsmod modinfo; do ln -s busybox "$root/run/ktls-vm/bin/$applet"; done
cut -d' ' -f1 /proc/uptime > /share/command-started

# The command's output leaves through the virtio serial port: raw bytes at several
# MB/s, where the 8250 UART manages about 250 KB/s and a tty would turn \n into \r\n.
# Kernel messages stay on ttyS0, which the host writes to console.log.
output=$(ls /dev/vport*p1 2>/dev/null | head -1)
[ -c "$output" ] || output=/dev/console
chroot $root /bin/bash "$RUN_DIR/command.sh" < /dev/null > "$output" 2>&1
echo $? > /share/status
cut -d' ' -f1 /proc/uptime > /share/command-finished
dmesg > /share/dmesg
echo 0 > /proc/sys/kernel/printk
sync
umount "$root$RUN_DIR" /share 2>/dev/null
poweroff -f
EOF
  chmod +x "$staging/init"
  (cd "$staging" && find . | "$CACHE/bb/bin/busybox" cpio -o -H newc 2>/dev/null) > initramfs.cpio.partial
  rm -rf "$staging"
  mv initramfs.cpio.partial initramfs.cpio
  log "initramfs ready for kernel $release"
}

# Writes the guest's command script: the caller's exported environment and working
# directory, then the command itself, each word quoted.
write_command_script() {
  local name
  echo 'set +e'
  while read -r name; do
    case $name in SHLVL | PWD | OLDPWD | _ | BASH_* | SHELLOPTS | BASHOPTS) continue ;; esac
    printf 'export %s=%q\n' "$name" "${!name}"
  done < <(compgen -e)
  echo 'export PATH="/run/ktls-vm/bin:$PATH"'
  printf 'cd %q || exit %d\n' "$PWD" "$EXIT_VM_FAILED"
  printf '%q ' "$@"
  echo
}

case ${1:-} in
  "" | -h | --help) usage ;;
esac
(prepare) || exit $?
if [[ $1 == --prepare ]]; then exit 0; fi

release=$(cat "$CACHE/kernel-release")
kernel=$CACHE/vmlinux
if [[ ! -s $kernel ]]; then kernel=$CACHE/root/boot/vmlinuz-$release; fi
run_dir=$(mktemp -d /tmp/ktls-vm.XXXXXX)
cleanup() {
  if [[ -n ${KTLS_VM_KEEP:-} ]]; then log "run directory kept: $run_dir"; else rm -rf "$run_dir"; fi
}
trap cleanup EXIT

write_command_script "$@" > "$run_dir/command.sh"

# The guest's init mounts the share tagged rw<N> at the Nth path of RW_DIRS.
rw_dirs=""
rw_shares=()
rw_count=0
IFS=: read -ra rw_list <<< "${KTLS_VM_RW:-}"
for dir in "${rw_list[@]}"; do
  [[ -n $dir ]] || continue
  dir=$(realpath "$dir")
  # The init splits RW_DIRS on whitespace.
  [[ $dir != *[[:space:]]* ]] || die "KTLS_VM_RW directory contains whitespace: $dir"
  rw_shares+=(-virtfs "local,path=$dir,mount_tag=rw$rw_count,security_model=none")
  rw_dirs+="$dir "
  rw_count=$((rw_count + 1))
done
printf 'RUN_DIR=%q\nMODULES_DIR=%q\nRW_DIRS=%q\n' \
  "$run_dir" "$CACHE/root/lib/modules/$release" "$rw_dirs" > "$run_dir/config"

# QEMU writes the command's output into a FIFO that cat copies to this script's stdout.
# Letting QEMU open /proc/self/fd/1 would open a regular file a second time, with its
# own file offset, and later writes through the caller's descriptor would overwrite it.
mkfifo "$run_dir/output"
cat "$run_dir/output" &
output_copier_pid=$!

started=$(date +%s.%N)
# QEMU runs in the background so that a signal to this script reaches it: timeout(1)
# puts itself into its own process group, so a Ctrl-C would reach only this script.
# ${KTLS_VM_QEMU_ARGS} is split on whitespace on purpose.
# shellcheck disable=SC2086
timeout -k 10 "$TIMEOUT_SECONDS" qemu-system-x86_64 \
  -accel "$ACCEL" -cpu max -smp "$CPUS" -m "$MEM_MIB" -M pc ${KTLS_VM_QEMU_ARGS:-} \
  -nodefaults -no-user-config -display none -vga none -no-reboot \
  -serial "file:$run_dir/console.log" \
  -device virtio-serial-pci \
  -chardev file,id=output,path="$run_dir/output" \
  -device virtserialport,chardev=output,name=ktls-vm.output \
  -kernel "$kernel" -initrd "$CACHE/initramfs.cpio" \
  -append "console=ttyS0 quiet panic=-1 oops=panic random.trust_cpu=on" \
  -virtfs "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap" \
  -virtfs "local,path=$run_dir,mount_tag=run,security_model=none" \
  "${rw_shares[@]}" < /dev/null &
qemu_pid=$!
interrupted=
trap 'interrupted=1; kill -TERM "$qemu_pid" 2>/dev/null' INT TERM HUP
# wait returns early when a trapped signal arrives, so wait again until QEMU is gone.
while :; do
  qemu_status=0
  wait "$qemu_pid" || qemu_status=$?
  kill -0 "$qemu_pid" 2>/dev/null || break
done
trap - INT TERM HUP
# cat ends at EOF once QEMU has closed the FIFO. If QEMU failed before opening it, cat
# still waits for a first writer, so open the FIFO read-write (which never blocks) and
# close it again: cat gets its EOF in both cases.
exec {fifo_fd}<>"$run_dir/output"
exec {fifo_fd}>&-
wait "$output_copier_pid" || true
if [[ -n $interrupted ]]; then log "interrupted"; exit 130; fi
finished=$(date +%s.%N)

if [[ -n ${KTLS_VM_DMESG:-} && -f $run_dir/dmesg ]]; then cat "$run_dir/dmesg" >&2; fi
# With `quiet`, the console shows only kernel messages of level error and worse. Leave
# out the "FS-Cache: Duplicate cookie detected" reports and their detail lines, which
# the 9p root mount with cache=loose prints when it meets a file id (qid) that already
# has a cookie: with no cache backend in the guest, fscache only skips that file.
console_errors=$(grep -v '^\[ *[0-9.]*\] FS-Cache: ' "$run_dir/console.log" || true)
if [[ -n $console_errors ]]; then
  log "guest console (kernel errors and init messages):"
  sed 's/^/  /' <<< "$console_errors" >&2
fi
if [[ -s $run_dir/command-started && -s $run_dir/command-finished ]]; then
  log "$(awk -v started="$started" -v finished="$finished" \
    -v boot="$(cat "$run_dir/command-started")" -v done="$(cat "$run_dir/command-finished")" \
    'BEGIN { printf "guest booted in %.1fs, the command ran for %.1fs, %.1fs in all", boot, done - boot, finished - started }')"
fi
if [[ -s $run_dir/status ]]; then exit "$(cat "$run_dir/status")"; fi
if [[ $qemu_status == 124 || $qemu_status == 137 ]]; then
  log "error: the guest timed out after ${TIMEOUT_SECONDS}s"
  exit 124
fi
die "the guest reported no exit status (QEMU exited with $qemu_status)"
