//! Records on the host: `<dir>/<flow-log id>.jsonl`, one JSON object per line, appended;
//! a file past its size bound is renamed to `.jsonl.1` (replacing the previous one) and a
//! new one started, so a host keeps at most twice the bound per flow log.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
};

use super::{aggregate::by_flow_log, record::FlowRecord};

/// Default bound per file: 64 MiB.
pub const DEFAULT_MAX_BYTES: u64 = 64 << 20;

/// The writer.
#[derive(Clone, Debug)]
pub struct JsonlSink {
    dir: PathBuf,
    max_bytes: u64,
}

impl JsonlSink {
    /// Writes under `dir` (created when needed), rotating at `max_bytes`.
    pub fn new(dir: impl Into<PathBuf>, max_bytes: u64) -> Self {
        JsonlSink {
            dir: dir.into(),
            max_bytes,
        }
    }

    /// The file of a flow log.
    pub fn path(&self, flow_log: &str) -> PathBuf {
        self.dir.join(format!("{flow_log}.jsonl"))
    }

    /// Appends records (grouped per flow log).
    pub fn write(&self, records: &[FlowRecord]) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        for (id, recs) in by_flow_log(records) {
            if id.is_empty() || id.contains('/') {
                continue;
            }
            let path = self.path(id);
            rotate_if_full(&path, self.max_bytes)?;
            let mut text = Vec::with_capacity(recs.len() * 400);
            for r in recs {
                serde_json::to_writer(&mut text, r)?;
                text.push(b'\n');
            }
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)?
                .write_all(&text)?;
        }
        Ok(())
    }
}

fn rotate_if_full(path: &Path, max: u64) -> std::io::Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if m.len() >= max => {
            let mut old = path.as_os_str().to_owned();
            old.push(".1");
            std::fs::rename(path, old)
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flowlogs::record::sample;

    #[test]
    fn appends_lines_per_flow_log_and_rotates() {
        let dir = std::env::temp_dir().join(format!("vpc-flowlogs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let sink = JsonlSink::new(&dir, 1000);
        let a = sample();
        let mut b = sample();
        b.flow_log_id = "fl-b".into();
        sink.write(&[a.clone(), b.clone(), a.clone()]).unwrap();
        let text = std::fs::read_to_string(sink.path(&a.flow_log_id)).unwrap();
        let lines: Vec<FlowRecord> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines, vec![a.clone(), a.clone()]);
        assert_eq!(
            std::fs::read_to_string(sink.path("fl-b"))
                .unwrap()
                .lines()
                .count(),
            1
        );
        // Past the bound: the next write starts a new file, the old one is kept as .1.
        for _ in 0..3 {
            sink.write(std::slice::from_ref(&a)).unwrap();
        }
        let rotated = dir.join(format!("{}.jsonl.1", a.flow_log_id));
        assert!(rotated.exists());
        assert!(std::fs::metadata(sink.path(&a.flow_log_id)).unwrap().len() < 1000);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
