//! Linux block devices: sysfs snapshots, identity resolution, waits, ioctls, loop devices, stable names, preflight.
//!
//! Nothing here runs external programs: kernel operations are ioctls, sysfs reads, inotify and netlink.

mod error;
pub mod ioctl;
pub mod loopdev;
mod names;
mod node;
pub mod preflight;
mod resolve;
mod sys;
pub mod sysfs;
mod wait;

pub use error::{Error, ErrorKind};
pub use loopdev::LoopDevice;
pub use names::StableNames;
pub use resolve::{by_id_names, serial_for_volume, ResolvedDevice, Resolver};
pub use wait::DeviceEvents;
