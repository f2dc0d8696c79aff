//! Files written whole or not at all: a unique temporary file beside the target, created
//! exclusively (never through a symlink) with its final mode before any byte is written, synced,
//! then renamed over the target.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Context, Result};

/// Writes `contents` to `path` atomically with `mode`, creating the directory when missing.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let write = || -> std::io::Result<()> {
        let mut file = tempfile::Builder::new()
            .prefix(".tlsbridge-")
            .permissions(std::fs::Permissions::from_mode(mode))
            .tempfile_in(dir)?;
        // The umask may have narrowed the mode at creation; set it exactly, still before data.
        file.as_file()
            .set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.write_all(contents)?;
        file.as_file().sync_all()?;
        file.persist(path).map_err(|err| err.error)?;
        Ok(())
    };
    write().with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn writes_with_the_exact_mode_and_replaces_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/ca.key");
        write_atomic(&path, b"one", 0o600).unwrap();
        write_atomic(&path, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(mode(&path), 0o600);
        let leftovers = std::fs::read_dir(path.parent().unwrap()).unwrap().count();
        assert_eq!(leftovers, 1, "no temporary file is left behind");
    }

    #[test]
    fn a_planted_world_writable_temporary_file_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        for planted in ["ca.tmp", "ca.key.tmp"] {
            let path = dir.path().join(planted);
            std::fs::write(&path, b"planted").unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        }
        let key = dir.path().join("ca.key");
        write_atomic(&key, b"secret", 0o600).unwrap();
        assert_eq!(mode(&key), 0o600);
        assert_eq!(
            std::fs::read(dir.path().join("ca.tmp")).unwrap(),
            b"planted"
        );
    }

    #[test]
    fn a_symlinked_target_is_replaced_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        std::fs::write(&elsewhere, b"untouched").unwrap();
        let link = dir.path().join("inventory.json");
        std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
        write_atomic(&link, b"[]", 0o600).unwrap();
        assert_eq!(std::fs::read(&elsewhere).unwrap(), b"untouched");
        assert_eq!(std::fs::read(&link).unwrap(), b"[]");
    }
}
