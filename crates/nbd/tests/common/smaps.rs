//! What a process keeps resident of a mapped file, from `/proc/PID/smaps`.

use std::path::Path;

/// KiB of `path` resident in process `pid`'s mappings of it (the `Rss` of each mapping whose name is the
/// path, also when the file was deleted): pages the kernel mapped for I/O through that mapping. `None`
/// when the process does not map the file.
pub fn mapped_rss_kib(pid: u32, path: &Path) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let name = path.to_str().unwrap();
    let deleted = format!("{name} (deleted)");
    let mut total = None;
    let mut ours = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            ours = line.ends_with(name) || line.ends_with(&deleted);
            if ours {
                total.get_or_insert(0);
            }
        } else if ours {
            if let Some(v) = line.strip_prefix("Rss:") {
                let kib: u64 = v.trim().trim_end_matches("kB").trim().parse().unwrap();
                *total.get_or_insert(0) += kib;
            }
        }
    }
    total
}
