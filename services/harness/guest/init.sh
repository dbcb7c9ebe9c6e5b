#!/bin/sh
# PID 1 of the kipvs guest (busybox sh, from the initramfs). Makes the host's root, shared read-only over
# virtio 9p, the lower layer of an overlay with a tmpfs upper layer (a writable copy that vanishes at
# power-off), binds the kernel's modules where modprobe looks, lets the kernel's module autoloading chroot
# into that root, runs /run/kipvs/command.sh there (written by the host on the read-write "xfer" share) and
# powers off. The command's exit status goes back in /run/kipvs/status and on the console.
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for module in /modules/*.ko; do insmod "$module" || echo "kipvs-guest: insmod $module failed"; done

fail() { echo "kipvs-guest: $*"; echo "=====KIPVS-GUEST-FAILED====="; poweroff -f; sleep 5; }

mount -t 9p -o trans=virtio,version=9p2000.L,cache=loose,msize=512000,ro hostroot /host || fail "no 9p host root"
mount -t tmpfs -o mode=0755 upper /upper || fail "no tmpfs"
mkdir -p /upper/data /upper/work
mount -t overlay overlay -o lowerdir=/host,upperdir=/upper/data,workdir=/upper/work /newroot || fail "no overlay"
R=/newroot
mount -t proc proc $R/proc
mount -t sysfs sys $R/sys
mount -t devtmpfs dev $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts $R/dev/pts
mount -t tmpfs -o mode=1777 shm $R/dev/shm
mount -t tmpfs -o mode=0755 run $R/run
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup 2>/dev/null
mkdir -p $R/run/kipvs
mount -t 9p -o trans=virtio,version=9p2000.L,cache=none xfer $R/run/kipvs || fail "no xfer share"
release=$(uname -r)
moddir=$(cat $R/run/kipvs/moddir 2>/dev/null)  # written by the host: the unpacked modules (any path)
if [ -n "$moddir" ]; then
    mkdir -p "$R/lib/modules/$release"
    mount --bind "$R$moddir" "$R/lib/modules/$release" || fail "cannot bind modules from $moddir"
fi
# The kernel runs this (in PID 1's root) for every request_module(): modprobe of the guest's root.
printf '#!/bin/sh\nexec /bin/chroot /newroot /sbin/modprobe "$@"\n' > /sbin/kipvs-modprobe
chmod 755 /sbin/kipvs-modprobe
echo /sbin/kipvs-modprobe > /proc/sys/kernel/modprobe
echo 1 > /proc/sys/kernel/printk
ip link set lo up 2>/dev/null || chroot $R ip link set lo up
chroot $R /bin/sh /run/kipvs/command.sh
echo "$?" > $R/run/kipvs/init-status
sync
poweroff -f
sleep 5
