//! The Debian package's configuration is generated from `config/sipedge.toml`
//! (`scripts/debian/make-config.sh`); a change to the seed file that is not carried over would
//! ship a stale `/etc/sipedge/sipedge.toml`. `scripts/package-test.sh` checks it too, but only
//! where cargo-deb is installed: this runs the same check in every `cargo test`.

use std::process::Command;

#[test]
fn the_packaged_config_is_the_seed_file_with_its_paths() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("bash")
        .arg(format!("{root}/scripts/debian/make-config.sh"))
        .arg("--check")
        .output()
        .expect("bash runs scripts/debian/make-config.sh");
    assert!(
        out.status.success(),
        "scripts/debian/sipedge.toml is stale: run scripts/debian/make-config.sh and commit it\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
