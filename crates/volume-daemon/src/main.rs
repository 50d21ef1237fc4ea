//! `volume-daemon`: the daemon binary.

fn main() {}
