//! Stable device names: symbolic links `vol<hex>` in one directory, one per appliance volume.
//!
//! Scheme: `vol` + the first 8 hex digits of the volume UUID (11 characters). When another volume
//! already holds that name, the later volume gets 12 hex digits, then 16, then all 32 (35 characters,
//! unique by construction). The choice depends only on the volume and the names already taken, so it is
//! re-derived the same way from the database at start-up. Links are created atomically (temporary link
//! + rename) and re-pointing is idempotent.

use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use uuid::Uuid;

use crate::Error;

const PREFIX: &str = "vol";
const LENGTHS: [usize; 4] = [8, 12, 16, 32];

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The stable-name directory.
#[derive(Debug, Clone)]
pub struct StableNames {
    dir: PathBuf,
}

impl StableNames {
    /// Names kept in `dir` (created on first link if missing).
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    /// The directory holding the links.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The name for `volume_id` given the names already `taken` (by this or other volumes).
    /// A volume that already holds a name keeps it.
    pub fn name_for(&self, volume_id: &Uuid, taken: &[(Uuid, String)]) -> String {
        if let Some((_, n)) = taken.iter().find(|(v, _)| v == volume_id) {
            return n.clone();
        }
        let hex = volume_id.simple().to_string();
        for len in LENGTHS {
            let candidate = format!("{PREFIX}{}", &hex[..len]);
            if !taken.iter().any(|(_, n)| *n == candidate) {
                return candidate;
            }
        }
        // Full-length names of different volumes cannot collide; keep the full form.
        format!("{PREFIX}{hex}")
    }

    /// Every name `volume_id` can have, shortest first (which one it has depends on the names taken).
    pub fn candidates(volume_id: &Uuid) -> Vec<String> {
        let hex = volume_id.simple().to_string();
        LENGTHS
            .iter()
            .map(|len| format!("{PREFIX}{}", &hex[..*len]))
            .collect()
    }

    /// Points link `name` at `target`, atomically; a link already pointing there is left alone.
    /// Returns the link's path.
    pub fn link(&self, name: &str, target: &Path) -> Result<PathBuf, Error> {
        check_name(name)?;
        let path = self.dir.join(name);
        match fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => {
                if fs::read_link(&path).map_err(Error::io("read link", path.clone()))? == target {
                    return Ok(path);
                }
            }
            Ok(_) => {
                return Err(Error::Invalid {
                    what: "stable name",
                    detail: format!(
                        "{} exists and is not a symbolic link; move it away",
                        path.display()
                    ),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir_all(&self.dir)
                    .map_err(Error::io("create the names directory", self.dir.clone()))?;
            }
            Err(e) => return Err(Error::io("inspect", path)(e)),
        }
        let tmp = self.dir.join(format!(
            ".{name}.tmp-{}-{}",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        symlink(target, &tmp).map_err(Error::io("create temporary link", tmp.clone()))?;
        if let Err(e) = fs::rename(&tmp, &path) {
            let _ = fs::remove_file(&tmp);
            return Err(Error::io("rename the temporary link onto", path)(e));
        }
        Ok(path)
    }

    /// Removes link `name`; `false` when there was none.
    pub fn unlink(&self, name: &str) -> Result<bool, Error> {
        check_name(name)?;
        let path = self.dir.join(name);
        match fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => match fs::remove_file(&path) {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
                Err(e) => Err(Error::io("remove", path)(e)),
            },
            Ok(_) => Err(Error::Invalid {
                what: "stable name",
                detail: format!(
                    "{} is not a symbolic link; it was left in place",
                    path.display()
                ),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io("inspect", path)(e)),
        }
    }

    /// All stable-name links and their targets, sorted by name (empty when the directory is missing).
    pub fn list(&self) -> Result<Vec<(String, PathBuf)>, Error> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io("list", self.dir.clone())(e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(Error::io("list", self.dir.clone()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with(PREFIX) || check_name(&name).is_err() {
                continue;
            }
            match fs::read_link(entry.path()) {
                Ok(target) => out.push((name, target)),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {} // not a link
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}    // removed meanwhile
                Err(e) => return Err(Error::io("read link", entry.path())(e)),
            }
        }
        out.sort();
        Ok(out)
    }
}

fn check_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid {
            what: "stable name",
            detail: format!(
                "{name:?} must be ASCII letters, digits, '-' or '_' and not start with '.'"
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(s: &str) -> Uuid {
        Uuid::parse_str(s).expect("uuid")
    }

    #[test]
    fn a_volume_only_ever_gets_one_of_its_candidate_names() {
        let n = StableNames::new(PathBuf::from("/unused"));
        let a = u("12345678-aaaa-4bbb-8ccc-000000000001");
        let b = u("12345678-aaaa-4bbb-8ccc-000000000002");
        let c = StableNames::candidates(&b);
        assert_eq!(c.first().map(String::as_str), Some("vol12345678"));
        assert_eq!(c.last().map(String::len), Some(35));
        let taken = vec![(a, n.name_for(&a, &[]))];
        assert!(c.contains(&n.name_for(&b, &taken)));
    }

    #[test]
    fn names_grow_deterministically_on_prefix_collision() {
        let n = StableNames::new(PathBuf::from("/unused"));
        let a = u("12345678-aaaa-4bbb-8ccc-000000000001");
        let b = u("12345678-aaaa-4bbb-8ccc-000000000002");
        let c = u("12345678-aaaa-4bbc-8ccc-000000000003");
        let d = u("12345678-aaaa-4bbc-8ccc-000000000004");
        let na = n.name_for(&a, &[]);
        assert_eq!(na, "vol12345678");
        let mut taken = vec![(a, na.clone())];
        let nb = n.name_for(&b, &taken);
        assert_eq!(nb, "vol12345678aaaa");
        taken.push((b, nb.clone()));
        let nc = n.name_for(&c, &taken);
        assert_eq!(nc, "vol12345678aaaa4bbc");
        taken.push((c, nc));
        assert_eq!(
            n.name_for(&d, &taken),
            "vol12345678aaaa4bbc8ccc000000000004"
        );
        // a volume keeps the name it holds; the same inputs give the same answer
        assert_eq!(n.name_for(&b, &taken), nb);
        assert_eq!(n.name_for(&b, &taken[..1]), "vol12345678aaaa");
        // a different prefix is unaffected
        assert_eq!(
            n.name_for(&u("abcdef01-0000-4000-8000-000000000000"), &taken),
            "volabcdef01"
        );
    }

    #[test]
    fn link_is_atomic_idempotent_and_repointable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let n = StableNames::new(dir.path().join("names"));
        assert!(n.list().expect("list empty").is_empty());
        let p = n
            .link("vol12345678", Path::new("/dev/loop3"))
            .expect("link");
        assert_eq!(fs::read_link(&p).expect("read"), Path::new("/dev/loop3"));
        assert_eq!(
            n.link("vol12345678", Path::new("/dev/loop3"))
                .expect("again"),
            p
        );
        n.link("vol12345678", Path::new("/dev/loop4"))
            .expect("repoint");
        assert_eq!(fs::read_link(&p).expect("read"), Path::new("/dev/loop4"));
        n.link("volabcdef01", Path::new("/dev/vdb"))
            .expect("second");
        let listed = n.list().expect("list");
        assert_eq!(
            listed,
            vec![
                ("vol12345678".to_string(), PathBuf::from("/dev/loop4")),
                ("volabcdef01".to_string(), PathBuf::from("/dev/vdb")),
            ]
        );
        let leftovers: Vec<_> = fs::read_dir(n.dir())
            .expect("dir")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "temporary links left behind");
        assert!(n.unlink("vol12345678").expect("unlink"));
        assert!(!n.unlink("vol12345678").expect("unlink again"));
        assert_eq!(n.list().expect("list").len(), 1);
    }

    #[test]
    fn refuses_bad_names_and_non_links() {
        let dir = tempfile::tempdir().expect("tempdir");
        let n = StableNames::new(dir.path().to_path_buf());
        for bad in ["", "../x", "a/b", ".hidden", "vol x"] {
            assert_eq!(
                n.link(bad, Path::new("/dev/null")).expect_err(bad).kind(),
                crate::ErrorKind::Invalid
            );
        }
        fs::write(dir.path().join("volfile"), b"x").expect("write");
        assert_eq!(
            n.link("volfile", Path::new("/dev/null"))
                .expect_err("file")
                .kind(),
            crate::ErrorKind::Invalid
        );
        assert_eq!(
            n.unlink("volfile").expect_err("file").kind(),
            crate::ErrorKind::Invalid
        );
        assert!(dir.path().join("volfile").exists());
    }
}
