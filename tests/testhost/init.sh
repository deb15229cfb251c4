#!/bin/busybox sh
# /init of the test host (built into its initramfs by prepare.sh).
#
# Loads KVM for AMD and 9p, checks that this is a hardware-virtualisation
# KVM (svm in cpuinfo, /dev/kvm), mounts the host's root read-only at /host
# and the scratch folder read-write at its host path, and runs
# SCRATCH/cmd.sh in a chroot of /host with the test host's own /proc, /sys
# (its own KSM), /dev, /tmp and /run. The command's output goes to
# SCRATCH/output, its exit status to SCRATCH/rc; then the test host powers
# off. Progress lines start with "testhost:" on the console; a failure
# before the command runs is written to SCRATCH/error.
bb=/bin/busybox
$bb --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say() { echo "testhost: $*" >/dev/console; }
halt() {
    sync
    poweroff -f
    sleep 5
    echo o >/proc/sysrq-trigger
}
scratch=
for arg in $(cat /proc/cmdline); do
    case "$arg" in ksmvm_th.scratch=*) scratch="${arg#ksmvm_th.scratch=}" ;; esac
done
fail() {
    say "ERROR: $*"
    [ -d /scratch/.ok ] && echo "$*" >/scratch/error
    halt
}
[ -n "$scratch" ] || fail "no ksmvm_th.scratch= on the command line"
for m in $(cat /modules/order); do
    insmod "/modules/$m.ko" || fail "insmod $m failed"
done
mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288 scratch /scratch ||
    fail "cannot mount the scratch share"
mkdir -p /scratch/.ok
grep -qw svm /proc/cpuinfo || fail "no svm in /proc/cpuinfo: QEMU gave no SVM (-cpu max with TCG is needed)"
[ -c /dev/kvm ] || fail "no /dev/kvm after loading kvm_amd: $(dmesg | grep -i -E 'kvm|svm' | tail -n 3)"
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=524288,cache=loose hostroot /host ||
    fail "cannot mount the host's root"
for d in proc sys dev tmp run; do [ -d "/host/$d" ] || fail "/host/$d is missing"; done
mount -t proc proc /host/proc
mount -t sysfs sysfs /host/sys
mount -t devtmpfs devtmpfs /host/dev
mkdir -p /host/dev/pts /host/dev/shm
mount -t devpts devpts /host/dev/pts
mount -t tmpfs -o mode=1777 tmpfs /host/dev/shm
mount -t tmpfs -o mode=1777 tmpfs /host/tmp
mount -t tmpfs -o mode=0755 tmpfs /host/run
mkdir -p "/host$scratch" 2>/dev/null
mount --bind /scratch "/host$scratch" || fail "cannot bind the scratch share at $scratch"
ip link set lo up
echo 1 >/proc/sys/kernel/panic_on_oops
say "ready: $(uname -r), $(grep -c ^processor /proc/cpuinfo) CPUs, $(awk '/MemTotal/ {print int($2/1024) " MiB"}' /proc/meminfo), kvm_amd npt=$(cat /sys/module/kvm_amd/parameters/npt)"
chroot /host /bin/sh "$scratch/cmd.sh" >"/scratch/output" 2>&1 </dev/null
echo "$?" >/scratch/rc.tmp && mv /scratch/rc.tmp /scratch/rc
say "command exited with $(cat /scratch/rc)"
halt
