//! Validation of what callers pass in (ids, device names, mount paths) and the file names built
//! from them. Pure.

use std::path::{Component, Path, PathBuf};

use super::StorageError;

/// The largest volume: the largest file ext4 holds with 4 KiB blocks is 16 TiB - 4 KiB, so
/// 16 TiB - 1 GiB (the volume files live on the host's filesystem, usually ext4).
pub const MAX_SIZE_GIB: u32 = 16 * 1024 - 1;

/// One GiB in bytes.
pub(super) const GIB: u64 = 1 << 30;

/// The suffix of volume and snapshot files.
const EXT: &str = ".img";

/// Whether `id` is `prefix` followed by 8 to 17 lowercase hex digits.
fn is_id(id: &str, prefix: &str) -> bool {
    id.strip_prefix(prefix).is_some_and(|hex| {
        (8..=17).contains(&hex.len())
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// Checks a volume id: `vol-` and 8 to 17 lowercase hex digits.
pub fn validate_volume_id(id: &str) -> Result<(), StorageError> {
    if is_id(id, "vol-") {
        Ok(())
    } else {
        Err(StorageError::Invalid(format!(
            "volume id {id:?}: expected vol- and 8 to 17 lowercase hex digits"
        )))
    }
}

/// Checks a snapshot id: `snap-` and 8 to 17 lowercase hex digits.
pub fn validate_snapshot_id(id: &str) -> Result<(), StorageError> {
    if is_id(id, "snap-") {
        Ok(())
    } else {
        Err(StorageError::Invalid(format!(
            "snapshot id {id:?}: expected snap- and 8 to 17 lowercase hex digits"
        )))
    }
}

/// Checks a size: 1 to [`MAX_SIZE_GIB`] GiB.
pub fn validate_size(size_gib: u32) -> Result<(), StorageError> {
    if (1..=MAX_SIZE_GIB).contains(&size_gib) {
        Ok(())
    } else {
        Err(StorageError::Invalid(format!(
            "size {size_gib} GiB: expected 1 to {MAX_SIZE_GIB}"
        )))
    }
}

/// Checks a device name as the instance sees it (`xvdf`, `sdf`, `nvme1n1`): 2 to 16 characters
/// of `[a-z0-9]`.
pub fn validate_device(device: &str) -> Result<(), StorageError> {
    if (2..=16).contains(&device.len())
        && device
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        Ok(())
    } else {
        Err(StorageError::Invalid(format!(
            "device name {device:?}: expected 2 to 16 characters of [a-z0-9]"
        )))
    }
}

/// Checks a mount path inside an instance: absolute, not `/`, at most 1024 bytes, components
/// plain (no `.`, `..`, empty or repeated `/`, no trailing `/`), of printable ASCII other than
/// space and backslash (mountinfo escapes those; refusing them keeps comparisons exact).
pub fn validate_mount_path(path: &Path) -> Result<(), StorageError> {
    let invalid = |why: &str| {
        Err(StorageError::Invalid(format!(
            "mount path {}: {why}",
            path.display()
        )))
    };
    let Some(s) = path.to_str() else {
        return invalid("not UTF-8");
    };
    if !s.starts_with('/') || s == "/" {
        return invalid("must be absolute and not /");
    }
    if s.len() > 1024 {
        return invalid("longer than 1024 bytes");
    }
    if !s.bytes().all(|b| b.is_ascii_graphic() && b != b'\\') {
        return invalid("only printable ASCII without spaces or backslashes");
    }
    if s.ends_with('/') || s.contains("//") {
        return invalid("empty component");
    }
    for c in path.components().skip(1) {
        match c {
            Component::Normal(_) => {}
            _ => return invalid("no . or .. components"),
        }
    }
    // `components` drops interior `.` silently: check the text too.
    if s.split('/').any(|c| c == "." || c == "..") {
        return invalid("no . or .. components");
    }
    Ok(())
}

/// `DIR/ID.img`: the file of a volume or snapshot (the id validated by the caller).
pub(super) fn file_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}{EXT}"))
}

/// `DIR/.ID.img.tmp`: where a volume or snapshot is made before it is renamed to
/// [`file_path`]. The leading dot keeps it out of listings.
pub(super) fn temp_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!(".{id}{EXT}.tmp"))
}

/// The id of a file name made by [`file_path`], if it is one with a valid id (for `prefix`
/// `vol-` or `snap-`).
pub(super) fn id_of_file_name(name: &str, prefix: &str) -> Option<String> {
    let id = name.strip_suffix(EXT)?;
    is_id(id, prefix).then(|| id.to_owned())
}

/// The device node's path inside the instance, `/dev/<device>` (validated by the caller).
pub(super) fn node_path(device: &str) -> PathBuf {
    Path::new("/dev").join(device)
}

/// The directories `mkdir -p` would create for `path`, outermost first, `/` excluded:
/// `/mnt/a/b` gives `/mnt`, `/mnt/a`, `/mnt/a/b`.
pub(super) fn ancestors_outermost_first(path: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = path
        .ancestors()
        .filter(|p| p.parent().is_some())
        .map(Path::to_path_buf)
        .collect();
    dirs.reverse();
    dirs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(validate_volume_id("vol-0123abcd").is_ok());
        assert!(validate_volume_id("vol-0123456789abcdef0").is_ok());
        assert!(validate_volume_id("vol-0123456789abcdef01").is_err()); // 18 digits
        assert!(validate_volume_id("vol-0123abc").is_err()); // 7 digits
        assert!(validate_volume_id("vol-0123ABCD").is_err());
        assert!(validate_volume_id("vol-0123abcg").is_err());
        assert!(validate_volume_id("snap-0123abcd").is_err());
        assert!(validate_volume_id("vol-../../etc").is_err());
        assert!(validate_volume_id("").is_err());
        assert!(validate_snapshot_id("snap-0123abcd").is_ok());
        assert!(validate_snapshot_id("vol-0123abcd").is_err());
        assert!(validate_snapshot_id("snap-0123abcd/").is_err());
    }

    #[test]
    fn sizes() {
        assert!(validate_size(0).is_err());
        assert!(validate_size(1).is_ok());
        assert!(validate_size(MAX_SIZE_GIB).is_ok());
        assert!(validate_size(MAX_SIZE_GIB + 1).is_err());
    }

    #[test]
    fn devices() {
        for ok in ["xvdf", "sdf", "nvme1n1", "ab", "abcdefghijklmnop"] {
            assert!(validate_device(ok).is_ok(), "{ok}");
        }
        for bad in [
            "a",
            "",
            "abcdefghijklmnopq",
            "xvd/f",
            "../sda",
            "XVDF",
            "xvd f",
            "xvd-f",
        ] {
            assert!(validate_device(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn mount_paths() {
        for ok in ["/data", "/mnt/data", "/mnt/vol-1_a.b", "/a/b/c/d"] {
            assert!(validate_mount_path(Path::new(ok)).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/",
            "data",
            "./data",
            "/mnt/../etc",
            "/mnt/./x",
            "/mnt/",
            "/mnt//x",
            "/a b",
            "/a\\b",
            "/a\tb",
            "/..",
            "/mnt/..",
        ] {
            assert!(validate_mount_path(Path::new(bad)).is_err(), "{bad}");
        }
        assert!(validate_mount_path(Path::new(&format!("/{}", "a".repeat(1024)))).is_err());
    }

    #[test]
    fn paths() {
        let dir = Path::new("/v");
        assert_eq!(
            file_path(dir, "vol-0123abcd"),
            Path::new("/v/vol-0123abcd.img")
        );
        assert_eq!(
            temp_path(dir, "vol-0123abcd"),
            Path::new("/v/.vol-0123abcd.img.tmp")
        );
        assert_eq!(
            id_of_file_name("vol-0123abcd.img", "vol-").as_deref(),
            Some("vol-0123abcd")
        );
        assert_eq!(id_of_file_name(".vol-0123abcd.img.tmp", "vol-"), None);
        assert_eq!(id_of_file_name("vol-0123abcd", "vol-"), None);
        assert_eq!(id_of_file_name("snap-0123abcd.img", "vol-"), None);
        assert_eq!(
            id_of_file_name("snap-0123abcd.img", "snap-").as_deref(),
            Some("snap-0123abcd")
        );
        assert_eq!(node_path("xvdf"), Path::new("/dev/xvdf"));
        assert_eq!(
            ancestors_outermost_first(Path::new("/mnt/a/b")),
            vec![
                PathBuf::from("/mnt"),
                PathBuf::from("/mnt/a"),
                PathBuf::from("/mnt/a/b")
            ]
        );
    }
}
