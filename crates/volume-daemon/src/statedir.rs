//! The daemon's state directory: created private (0750), held by one daemon at a time through an
//! exclusive lock on `volume-daemon.lock`, whose text names the holder.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{flock, FlockOperation};

/// The lock file's name inside the state directory.
pub(crate) const LOCK_FILE: &str = "volume-daemon.lock";
/// The file holding the installation's id: who holds the appliance lease (see [`StateDirLock::instance_id`]).
const INSTANCE_FILE: &str = "instance-id";

/// The state directory could not be prepared or is held by another daemon.
#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    #[error("cannot create the state directory {path}; create it or set state_dir")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open or lock {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the state directory {dir} is in use by another volume-daemon ({holder}); stop that one first, or give this one its own state_dir")]
    Held { dir: PathBuf, holder: String },
}

/// Creates `dir` (and missing parents) with mode 0750.
pub(crate) fn create_private(dir: &Path) -> Result<(), StateDirError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o750)
        .create(dir)
        .map_err(|source| StateDirError::Create {
            path: dir.to_path_buf(),
            source,
        })
}

/// Who holds the state directory's lock, as the holder wrote it, when it is held; reads only.
pub(crate) fn holder(dir: &Path) -> Option<String> {
    let mut file = File::open(dir.join(LOCK_FILE)).ok()?;
    match flock(&file, FlockOperation::NonBlockingLockShared) {
        Ok(()) => None, // free (the shared lock goes with the file)
        Err(_) => holder_text(&mut file),
    }
}

/// The text the holder wrote into the lock file, when there is any.
fn holder_text(file: &mut File) -> Option<String> {
    let mut text = String::new();
    file.read_to_string(&mut text).ok()?;
    Some(text.trim().to_owned()).filter(|t| !t.is_empty())
}

/// The file of an SQLite database URL (`sqlite://PATH?…` or `sqlite:PATH`), unless in memory.
pub(crate) fn sqlite_path(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or_default();
    (!path.is_empty() && path != ":memory:").then(|| PathBuf::from(path))
}

/// Creates the SQLite database file of `url` with mode 0640 when it does not exist yet (SQLite would
/// create it with the umask's mode; its journal files take the database file's mode).
pub(crate) fn precreate_sqlite(url: &str) -> Result<(), StateDirError> {
    let Some(path) = sqlite_path(url) else {
        return Ok(());
    };
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .open(&path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(StateDirError::Create { path, source }),
    }
}

/// The exclusive hold on a state directory; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct StateDirLock {
    _file: File,
    dir: PathBuf,
}

impl StateDirLock {
    /// Creates the directory if needed and takes its lock without waiting; a held lock is an error
    /// naming the holder (pid, host and start time, as it wrote them).
    pub fn acquire(dir: &Path) -> Result<Self, StateDirError> {
        create_private(dir)?;
        let path = dir.join(LOCK_FILE);
        let lock_err = |source: std::io::Error| StateDirError::Lock {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o640)
            .open(&path)
            .map_err(lock_err)?;
        if let Err(e) = flock(&file, FlockOperation::NonBlockingLockExclusive) {
            if e == rustix::io::Errno::WOULDBLOCK {
                return Err(StateDirError::Held {
                    dir: dir.to_path_buf(),
                    holder: holder_text(&mut file).unwrap_or_else(|| "holder unknown".to_owned()),
                });
            }
            return Err(lock_err(e.into()));
        }
        let host = rustix::system::uname()
            .nodename()
            .to_string_lossy()
            .into_owned();
        let text = format!(
            "pid {} on {host}, since {}",
            std::process::id(),
            chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ")
        );
        file.set_len(0).map_err(lock_err)?;
        file.seek(SeekFrom::Start(0)).map_err(lock_err)?;
        file.write_all(text.as_bytes()).map_err(lock_err)?;
        Ok(Self {
            _file: file,
            dir: dir.to_path_buf(),
        })
    }

    /// The id of this state directory (made at its first use, kept in `instance-id`): the appliance lease's
    /// holder id. Only the daemon holding this lock runs with it, so a lease found under this id was left by
    /// an earlier run here that is gone, and may be taken over at once.
    pub fn instance_id(&self) -> Result<String, StateDirError> {
        let path = self.dir.join(INSTANCE_FILE);
        if let Ok(text) = std::fs::read_to_string(&path) {
            if let Ok(id) = uuid::Uuid::parse_str(text.trim()) {
                return Ok(id.to_string());
            }
        }
        let id = uuid::Uuid::new_v4().to_string();
        let err = |source| StateDirError::Create {
            path: path.clone(),
            source,
        };
        let tmp = self.dir.join(format!("{INSTANCE_FILE}.new"));
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o640)
            .open(&tmp)
            .map_err(err)?;
        f.write_all(id.as_bytes()).map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, &path).map_err(err)?;
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_name() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("state");
        let first = StateDirLock::acquire(&dir).expect("first lock");
        let err = StateDirLock::acquire(&dir).expect_err("held");
        let text = err.to_string();
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        drop(first);
        StateDirLock::acquire(&dir).expect("free again after the first is dropped");
    }

    #[test]
    fn sqlite_paths_come_from_urls() {
        assert_eq!(
            sqlite_path("sqlite:///var/lib/vd/db.sqlite?mode=rwc"),
            Some(PathBuf::from("/var/lib/vd/db.sqlite"))
        );
        assert_eq!(sqlite_path("sqlite:rel.db"), Some(PathBuf::from("rel.db")));
        assert_eq!(sqlite_path("sqlite::memory:"), None);
        assert_eq!(sqlite_path("postgres://h/db"), None);
    }

    #[test]
    fn the_directory_is_created_private() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("a/b");
        let _lock = StateDirLock::acquire(&dir).expect("lock");
        let mode = std::fs::metadata(&dir).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode & 0o027, 0, "state dir mode {mode:o}");
        let mode = std::fs::metadata(dir.join(LOCK_FILE))
            .expect("meta")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode & 0o037, 0, "lock file mode {mode:o}");
    }
}
