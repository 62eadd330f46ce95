//! Helpers shared by the VM runner's integration tests.

/// Whether `/dev/kvm` can be opened; prints why a test is skipped if not.
pub fn kvm_available() -> bool {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
    {
        return true;
    }
    eprintln!("skipped: /dev/kvm is not available on this host");
    false
}
