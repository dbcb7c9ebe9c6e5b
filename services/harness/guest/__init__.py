"""A real Linux kernel with IPVS and nf_tables on any of these hosts: Debian's stock kernel under QEMU.

``image`` prepares the guest's files once (the kernel and its modules, unpacked from Debian's package, and a
small busybox initramfs); ``vm`` boots it, runs one command and hands back its status and console. The
demo, the kernel tests and the applier benchmark all use it; see docs/architecture.md ("A real kernel").
"""
