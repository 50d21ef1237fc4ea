//! `nbd-serve`: serve files or block devices over NBD until SIGTERM.

fn main() {}
