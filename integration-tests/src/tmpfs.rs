//! A small tmpfs mounted for one test (to fill a node's disk), unmounted
//! when dropped. Mounting needs root, as CI runs.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A mounted tmpfs; unmounted (lazily) on drop.
#[derive(Debug)]
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as `mount -o size=` takes it) at `at`.
    /// Panics with an explanation when it cannot.
    pub fn mount(at: &Path, size: &str) -> Tmpfs {
        let made = std::fs::create_dir_all(at);
        assert!(made.is_ok(), "cannot create {}: {made:?}", at.display());
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status();
        assert!(
            st.is_ok_and(|s| s.success()),
            "this test mounts a small tmpfs to fill a node's disk: run it as root"
        );
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
