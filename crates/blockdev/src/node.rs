//! What a path is, as plain data: a block device (with its major:minor), a regular file, or something else.

use std::fs::{FileType, Metadata};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use crate::sysfs::SysRoot;
use crate::Error;

/// The kind of a device node, after following symlinks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Node {
    Block { major: u32, minor: u32 },
    Regular { size: u64 },
    Other(&'static str),
}

/// A short name for a file type, for messages.
pub(crate) fn file_kind(t: &FileType) -> &'static str {
    if t.is_block_device() {
        "block device"
    } else if t.is_file() {
        "regular file"
    } else if t.is_dir() {
        "directory"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_symlink() {
        "symbolic link"
    } else if t.is_fifo() {
        "fifo"
    } else if t.is_socket() {
        "socket"
    } else {
        "special file"
    }
}

fn from_metadata(meta: &Metadata) -> Node {
    let t = meta.file_type();
    if t.is_block_device() {
        Node::Block {
            major: rustix::fs::major(meta.rdev()),
            minor: rustix::fs::minor(meta.rdev()),
        }
    } else if t.is_file() {
        Node::Regular { size: meta.len() }
    } else {
        Node::Other(file_kind(&t))
    }
}

/// Inspects `path` (following symlinks).
#[cfg_attr(not(test), allow(unused_variables))]
pub(crate) fn probe(root: &SysRoot, path: &Path) -> Result<Node, Error> {
    let meta = std::fs::metadata(path).map_err(Error::io("inspect", path))?;
    let node = from_metadata(&meta);
    #[cfg(test)]
    if root.simulated_nodes {
        if let Node::Regular { .. } = node {
            if let Ok(text) = std::fs::read_to_string(path) {
                if let Some((major, minor)) = text
                    .strip_prefix("block ")
                    .and_then(crate::sysfs::parse_major_minor)
                {
                    return Ok(Node::Block { major, minor });
                }
            }
        }
    }
    Ok(node)
}
