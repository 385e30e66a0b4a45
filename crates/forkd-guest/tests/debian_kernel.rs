//! Fetches the real Debian cloud kernel: needs network and apt, so it is
//! ignored by default. Run with `cargo test -p forkd-guest -- --ignored`.

use forkd_guest::{ensure_debian_kernel, modules::ModuleIndex, GUEST_MODULES};

#[test]
#[ignore = "downloads the Debian kernel with apt-get"]
fn fetches_and_extracts_the_debian_cloud_kernel() {
    let home = tempfile::tempdir().unwrap();
    let kernel = ensure_debian_kernel(home.path(), &|line| eprintln!("{line}")).unwrap();
    assert!(kernel.vmlinuz.is_file());
    assert!(kernel.modules_dir.ends_with(&kernel.version));
    let closure = ModuleIndex::scan(&kernel.modules_dir)
        .unwrap()
        .closure(GUEST_MODULES)
        .unwrap();
    assert!(closure.len() >= GUEST_MODULES.len());
    // Second call: no network, same kernel.
    let again = ensure_debian_kernel(home.path(), &|_| panic!("must not fetch again")).unwrap();
    assert_eq!(again, kernel);
}
