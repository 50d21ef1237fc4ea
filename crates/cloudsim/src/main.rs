//! `cloudsim`: run the CloudStack simulator as its own process.

fn main() {}
