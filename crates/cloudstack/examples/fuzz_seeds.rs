//! Writes the fuzz target's seed inputs into the directory given: each fixture of `tests/fixtures` as the
//! answer of its command (the file name's prefix) with status 200, in the harness's format
//! (`cloudstack::fuzzing::input`). Run by `scripts/fuzz` before fuzzing `responses`.

use std::path::{Path, PathBuf};

fn main() -> std::io::Result<()> {
    let out = PathBuf::from(std::env::args_os().nth(1).ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "usage: fuzz_seeds DIR")
    })?);
    std::fs::create_dir_all(&out)?;
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut written = 0;
    for entry in std::fs::read_dir(&fixtures)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let command = name.split('_').next().unwrap_or_default();
        if !path.is_file() {
            continue;
        }
        if let Some(data) = cloudstack::fuzzing::input(200, command, &std::fs::read(&path)?) {
            std::fs::write(out.join(format!("fixture-{name}")), data)?;
            written += 1;
        }
    }
    eprintln!("{written} seeds in {}", out.display());
    Ok(())
}
