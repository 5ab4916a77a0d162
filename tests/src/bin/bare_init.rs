//! `ironroot-bare-init`: the boot benchmark's baseline (`just bench`, scripts/bench-boot.sh).
//! Packed as `/init` by the same initramfs builder, with the same kernel, modules and command
//! line as a node's: it prints one line and powers off at once, so QEMU start → QEMU exit is
//! the boot a node would have without any of the agent's work.

fn main() {
    // The kernel opened /dev/console (in the initramfs) as stdin, stdout and stderr.
    println!("ironroot-bare-init: userspace reached; powering off");
    if let Err(e) = rustix::system::reboot(rustix::system::RebootCommand::PowerOff) {
        eprintln!("ironroot-bare-init: power off failed: {e}");
    }
    // PID 1 must not exit (the kernel would panic); wait for the power to go.
    loop {
        std::thread::park();
    }
}
