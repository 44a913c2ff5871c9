//! Parsing what the kernel shows: `/proc/<pid>/mountinfo` lines, `/sys/block/loopN/dev` and
//! `/sys/block/loopN/loop/backing_file`, `blkid -o export`. Pure.

use std::path::Path;

/// One line of mountinfo (proc(5)): the fields this module uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct MountEntry {
    /// The mounted device, `major:minor` (for block devices the device's numbers).
    pub dev: (u32, u32),
    /// Where it is mounted, relative to the root of the process whose mountinfo this is;
    /// unescaped.
    pub mount_point: String,
    /// The filesystem type, e.g. `ext4`.
    pub fstype: String,
}

/// Undoes mountinfo's octal escapes (`\040` space, `\011` tab, `\012` newline, `\134`
/// backslash).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses `major:minor`.
pub(super) fn parse_dev(s: &str) -> Option<(u32, u32)> {
    let (major, minor) = s.trim().split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// Parses mountinfo; lines that do not parse are skipped (the format is stable; a skipped line
/// only hides that mount).
pub(super) fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_mountinfo_line).collect()
}

/// `36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue`
fn parse_mountinfo_line(line: &str) -> Option<MountEntry> {
    let mut fields = line.split(' ');
    let _id = fields.next()?;
    let _parent = fields.next()?;
    let dev = parse_dev(fields.next()?)?;
    let _root = fields.next()?;
    let mount_point = unescape(fields.next()?);
    // Options, then optional fields up to the separator.
    fields.by_ref().find(|f| *f == "-")?;
    let fstype = fields.next()?.to_owned();
    Some(MountEntry {
        dev,
        mount_point,
        fstype,
    })
}

/// The mounts at `path` in mountinfo order: the last one is on top (what the path shows).
pub(super) fn mounts_at<'a>(entries: &'a [MountEntry], path: &Path) -> Vec<&'a MountEntry> {
    entries
        .iter()
        .filter(|e| Path::new(&e.mount_point) == path)
        .collect()
}

/// How a loop device's `backing_file` relates to a volume's file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Backing {
    /// It is the file.
    Live,
    /// It was a file at that path that has since been deleted or replaced (the kernel appends
    /// ` (deleted)`): the device holds an old inode, not the current volume.
    Deleted,
}

/// Whether `backing_file` (the sysfs text: the path, ` (deleted)` if unlinked, newline) names
/// `file` (an absolute, canonical path).
pub(super) fn backing_matches(backing_file: &str, file: &Path) -> Option<Backing> {
    let text = backing_file.strip_suffix('\n').unwrap_or(backing_file);
    let file = file.to_str()?;
    if text == file {
        Some(Backing::Live)
    } else if text.strip_suffix(" (deleted)") == Some(file) {
        Some(Backing::Deleted)
    } else {
        None
    }
}

/// What `blkid -p -o export` found on a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Probe {
    /// No signature at all (blkid's exit status 2).
    Empty,
    /// A filesystem (`TYPE=`).
    Filesystem(String),
    /// Something else: a partition table (`PTTYPE=`) or other signature without `TYPE`.
    Other(String),
}

/// Parses `blkid -p -o export` output (exit status 0).
pub(super) fn parse_blkid(out: &str) -> Probe {
    let value = |key: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(str::to_owned)
    };
    if let Some(t) = value("TYPE") {
        Probe::Filesystem(t)
    } else if let Some(t) = value("PTTYPE") {
        Probe::Other(format!("partition table {t}"))
    } else {
        Probe::Other(out.trim().replace('\n', " "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
23 22 0:5 / /dev rw,nosuid shared:2 - devtmpfs devtmpfs rw,size=4k
200 22 0:60 / /mnt rw,relatime - tmpfs tmpfs rw
201 200 7:3 / /mnt/data rw,relatime - ext4 /dev/xvdf rw
202 200 7:4 / /mnt/my\\040data rw,relatime master:3 propagate_from:1 - ext4 /dev/xvdg rw
203 200 7:5 / /mnt/data rw,relatime - ext4 /dev/xvdh rw
garbage line
";

    #[test]
    fn mountinfo() {
        let e = parse_mountinfo(MOUNTINFO);
        assert_eq!(e.len(), 6);
        assert_eq!(
            e[3],
            MountEntry {
                dev: (7, 3),
                mount_point: "/mnt/data".into(),
                fstype: "ext4".into()
            }
        );
        assert_eq!(e[4].mount_point, "/mnt/my data");
        assert_eq!(e[4].fstype, "ext4");
        assert_eq!(e[1].fstype, "devtmpfs");
        let at = mounts_at(&e, Path::new("/mnt/data"));
        assert_eq!(at.len(), 2);
        assert_eq!(at.last().unwrap().dev, (7, 5)); // on top
        assert!(mounts_at(&e, Path::new("/mnt/dat")).is_empty());
        assert!(mounts_at(&e, Path::new("/mnt/data/x")).is_empty());
    }

    #[test]
    fn unescaping() {
        assert_eq!(unescape("/a\\040b\\011c\\134d"), "/a b\tc\\d");
        assert_eq!(unescape("/a\\04"), "/a\\04");
        assert_eq!(unescape("/a\\"), "/a\\");
        assert_eq!(unescape("/a\\999"), "/a\\999");
    }

    #[test]
    fn devs() {
        assert_eq!(parse_dev("7:12\n"), Some((7, 12)));
        assert_eq!(parse_dev("259:0"), Some((259, 0)));
        assert_eq!(parse_dev("7"), None);
        assert_eq!(parse_dev("a:b"), None);
    }

    #[test]
    fn backing() {
        let f = Path::new("/var/lib/vpc/v/vol-0123abcd.img");
        assert_eq!(
            backing_matches("/var/lib/vpc/v/vol-0123abcd.img\n", f),
            Some(Backing::Live)
        );
        assert_eq!(
            backing_matches("/var/lib/vpc/v/vol-0123abcd.img", f),
            Some(Backing::Live)
        );
        assert_eq!(
            backing_matches("/var/lib/vpc/v/vol-0123abcd.img (deleted)\n", f),
            Some(Backing::Deleted)
        );
        assert_eq!(
            backing_matches("/var/lib/vpc/v/vol-0123abcd.img2\n", f),
            None
        );
        assert_eq!(backing_matches("/other/vol-0123abcd.img\n", f), None);
        assert_eq!(backing_matches("\n", f), None);
    }

    #[test]
    fn blkid() {
        assert_eq!(
            parse_blkid("DEVNAME=/dev/loop3\nUUID=x\nBLOCK_SIZE=4096\nTYPE=ext4\n"),
            Probe::Filesystem("ext4".into())
        );
        assert_eq!(
            parse_blkid("DEVNAME=/dev/loop3\nPTUUID=x\nPTTYPE=gpt\n"),
            Probe::Other("partition table gpt".into())
        );
        assert_eq!(
            parse_blkid("DEVNAME=/dev/loop3\n"),
            Probe::Other("DEVNAME=/dev/loop3".into())
        );
    }
}
