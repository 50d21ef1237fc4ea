//! Linux block devices: sysfs snapshots, identity resolution, waits, ioctls, loop devices, stable names, preflight.
