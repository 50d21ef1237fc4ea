//! The simulator's durable state: a snapshot file (`state.json`) plus an append-only change log
//! (`state.log`), so that each change costs O(1) work however large the cloud is.
//!
//! Each commit appends one line, a JSON array of the changed entities in their new form (or a removal
//! marker), and syncs it: a commit is the line, so it is atomic, and a line cut short by a crash is
//! dropped at the next start. When the log outgrows both [`COMPACT_MIN_BYTES`] and twice the snapshot,
//! the whole state is written to a new snapshot (temporary file, sync, rename) and the log is emptied;
//! that O(n) step happens once per O(n) changes, so the work per change stays constant on average.
//! Replaying a log over a snapshot that already holds its changes gives the same state, because every
//! record is a whole entity.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::SimError;
use crate::model::{Job, Key, Snapshot, State, Vm, Volume, STATE_VERSION};

/// The log is compacted only when larger than this (and larger than twice the snapshot).
pub const COMPACT_MIN_BYTES: u64 = 4 << 20;

/// One change in the log.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum Record {
    Meta {
        next_seq: u64,
        leftover_links: Vec<PathBuf>,
    },
    Vm {
        vm: Vm,
    },
    VmGone {
        id: String,
    },
    Volume {
        volume: Volume,
    },
    VolumeGone {
        id: String,
    },
    Snapshot {
        snapshot: Snapshot,
    },
    SnapshotGone {
        id: String,
    },
    Job {
        job: Job,
    },
}

/// The open store of one state directory.
#[derive(Debug)]
pub(crate) struct Store {
    snapshot_path: PathBuf,
    log_path: PathBuf,
    log: File,
    log_bytes: u64,
    snapshot_bytes: u64,
    /// [`COMPACT_MIN_BYTES`], smaller in tests.
    compact_min: u64,
}

fn apply(st: &mut State, rec: Record) {
    match rec {
        Record::Meta {
            next_seq,
            leftover_links,
        } => {
            st.next_seq = next_seq;
            st.leftover_links = leftover_links;
        }
        Record::Vm { vm } => {
            if let Some(slot) = st.vms.iter_mut().find(|v| v.id == vm.id) {
                *slot = vm;
            } else {
                st.vms.push(vm);
            }
        }
        Record::VmGone { id } => st.vms.retain(|v| v.id != id),
        Record::Volume { volume } => {
            st.volumes.insert(volume.id.clone(), volume);
        }
        Record::VolumeGone { id } => {
            st.volumes.shift_remove(&id);
        }
        Record::Snapshot { snapshot } => {
            st.snapshots.insert(snapshot.id.clone(), snapshot);
        }
        Record::SnapshotGone { id } => {
            st.snapshots.shift_remove(&id);
        }
        Record::Job { job } => {
            st.jobs.insert(job.id.clone(), job);
        }
    }
}

fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent() {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

impl Store {
    /// Opens the store in `dir`: loads the snapshot (or takes `fresh()` when there is none), replays the
    /// log over it and drops a last line cut short by a crash.
    pub fn open(dir: &Path, fresh: impl FnOnce() -> State) -> Result<(Self, State), SimError> {
        let snapshot_path = dir.join("state.json");
        let log_path = dir.join("state.log");
        let corrupt = |path: &Path| {
            let path = path.to_path_buf();
            move |source| SimError::CorruptState { path, source }
        };
        let (mut st, snapshot_bytes, existed) = match fs::read(&snapshot_path) {
            Ok(bytes) => {
                #[derive(Deserialize)]
                struct Layout {
                    version: u32,
                }
                let layout: Layout =
                    serde_json::from_slice(&bytes).map_err(corrupt(&snapshot_path))?;
                if layout.version != STATE_VERSION {
                    return Err(SimError::StateVersion {
                        path: snapshot_path,
                        found: layout.version,
                        expected: STATE_VERSION,
                    });
                }
                let st: State = serde_json::from_slice(&bytes).map_err(corrupt(&snapshot_path))?;
                (st, bytes.len() as u64, true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (fresh(), 0, false),
            Err(e) => return Err(SimError::io("read state file", &snapshot_path)(e)),
        };
        let mut valid = 0u64;
        match File::open(&log_path) {
            Ok(f) => {
                let mut reader = BufReader::new(f);
                let mut line = Vec::new();
                loop {
                    line.clear();
                    let n = reader
                        .read_until(b'\n', &mut line)
                        .map_err(SimError::io("read state log", &log_path))?;
                    if n == 0 || line.last() != Some(&b'\n') {
                        break; // end, or a line cut short by a crash: never committed
                    }
                    let records: Vec<Record> =
                        serde_json::from_slice(&line).map_err(corrupt(&log_path))?;
                    for rec in records {
                        apply(&mut st, rec);
                    }
                    valid += n as u64;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(SimError::io("read state log", &log_path)(e)),
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(SimError::io("open state log", &log_path))?;
        log.set_len(valid)
            .map_err(SimError::io("truncate state log", &log_path))?;
        st.take_dirty();
        let mut store = Self {
            snapshot_path,
            log_path,
            log,
            log_bytes: valid,
            snapshot_bytes,
            compact_min: COMPACT_MIN_BYTES,
        };
        if !existed {
            store.compact(&st)?;
        }
        Ok((store, st))
    }

    /// Makes every change recorded in `st` since the last commit durable: one appended, synced line.
    pub fn commit(&mut self, st: &mut State) -> Result<(), SimError> {
        let dirty = st.take_dirty();
        if dirty.is_empty() {
            return Ok(());
        }
        let records: Vec<Record> = dirty
            .into_iter()
            .filter_map(|key| match key {
                Key::Meta => Some(Record::Meta {
                    next_seq: st.next_seq,
                    leftover_links: st.leftover_links.clone(),
                }),
                Key::Vm(id) => Some(match st.vm(&id) {
                    Some(vm) => Record::Vm { vm: vm.clone() },
                    None => Record::VmGone { id },
                }),
                Key::Volume(id) => Some(match st.volume(&id) {
                    Some(v) => Record::Volume { volume: v.clone() },
                    None => Record::VolumeGone { id },
                }),
                Key::Snapshot(id) => Some(match st.snapshot(&id) {
                    Some(s) => Record::Snapshot {
                        snapshot: s.clone(),
                    },
                    None => Record::SnapshotGone { id },
                }),
                Key::Job(id) => st.job(&id).cloned().map(|job| Record::Job { job }),
            })
            .collect();
        let mut line =
            serde_json::to_vec(&records).expect("invariant: state records serialize to JSON");
        line.push(b'\n');
        self.log
            .write_all(&line)
            .map_err(SimError::io("append to state log", &self.log_path))?;
        self.log
            .sync_data()
            .map_err(SimError::io("sync state log", &self.log_path))?;
        self.log_bytes += line.len() as u64;
        if self.log_bytes > self.compact_min.max(2 * self.snapshot_bytes) {
            self.compact(st)?;
        }
        Ok(())
    }

    /// Writes the whole state as the new snapshot and empties the log.
    fn compact(&mut self, st: &State) -> Result<(), SimError> {
        let tmp = self.snapshot_path.with_extension("json.tmp");
        let body = serde_json::to_vec(st).expect("invariant: the state serializes to JSON");
        let mut f = File::create(&tmp).map_err(SimError::io("write state file", &tmp))?;
        f.write_all(&body)
            .map_err(SimError::io("write state file", &tmp))?;
        f.sync_all()
            .map_err(SimError::io("sync state file", &tmp))?;
        fs::rename(&tmp, &self.snapshot_path)
            .map_err(SimError::io("replace state file", &self.snapshot_path))?;
        sync_dir(&self.snapshot_path);
        self.log
            .set_len(0)
            .map_err(SimError::io("truncate state log", &self.log_path))?;
        self.log
            .sync_all()
            .map_err(SimError::io("sync state log", &self.log_path))?;
        self.snapshot_bytes = body.len() as u64;
        self.log_bytes = 0;
        Ok(())
    }

    /// Current sizes of the snapshot and the log, in bytes.
    #[cfg(test)]
    pub fn sizes(&self) -> (u64, u64) {
        (self.snapshot_bytes, self.log_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{now_string, VolumeState, GIB};

    fn volume(st: &mut State, name: &str) -> String {
        let id = st.next_id();
        st.insert_volume(Volume {
            id: id.clone(),
            name: name.into(),
            size: GIB,
            offering_id: None,
            state: VolumeState::Allocated,
            created: now_string(),
            attachment: None,
            tags: Vec::new(),
        });
        id
    }

    #[test]
    fn commits_survive_reopen_and_a_torn_line_is_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut store, mut st) = Store::open(dir.path(), || State::new(3, None)).expect("open");
        let a = volume(&mut st, "a");
        store.commit(&mut st).expect("commit");
        let b = volume(&mut st, "b");
        store.commit(&mut st).expect("commit");
        st.remove_volume(&a);
        store.commit(&mut st).expect("commit");
        let (_, log_len) = store.sizes();
        drop(store);
        // A crash in the middle of the next commit leaves half a line.
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join("state.log"))
            .expect("log");
        f.write_all(br#"[{"t":"volume_gone","id":"#).expect("write");
        drop(f);

        let (store, back) = Store::open(dir.path(), || panic!("state exists")).expect("reopen");
        assert!(back.volume(&a).is_none());
        assert_eq!(back.volume(&b).map(|v| v.name.as_str()), Some("b"));
        assert_eq!(back.next_seq, st.next_seq);
        assert_eq!(store.sizes().1, log_len, "torn line truncated");
    }

    #[test]
    fn an_older_layout_is_refused_with_its_version() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(
            dir.path().join("state.json"),
            br#"{"version":1,"volumes":[]}"#,
        )
        .expect("write");
        let err = Store::open(dir.path(), || panic!("state exists")).expect_err("refused");
        assert!(
            matches!(err, SimError::StateVersion { found: 1, .. }),
            "{err}"
        );
        assert_eq!(err.kind(), crate::SimErrorKind::State);
    }

    #[test]
    fn log_is_compacted_and_replay_stays_correct() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut store, mut st) = Store::open(dir.path(), || State::new(3, None)).expect("open");
        store.compact_min = 64 << 10;
        let mut ids = Vec::new();
        let mut compactions = 0;
        for i in 0..1_000 {
            let before = store.sizes().0;
            ids.push(volume(&mut st, &format!("v{i}")));
            store.commit(&mut st).expect("commit");
            if store.sizes().0 != before {
                compactions += 1;
            }
        }
        assert!(compactions >= 1, "the log was compacted");
        let (snap, log) = store.sizes();
        assert!(log <= (64 << 10).max(2 * snap), "log {log} snapshot {snap}");
        drop(store);
        let (_, back) = Store::open(dir.path(), || panic!("state exists")).expect("reopen");
        assert_eq!(back.volumes.len(), st.volumes.len());
        assert_eq!(
            back.volume(&ids[999]).map(|v| v.name.as_str()),
            Some("v999")
        );
    }
}
