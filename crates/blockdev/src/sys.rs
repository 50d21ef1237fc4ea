//! Kernel ABI constants and structures from `<linux/fs.h>` and `<linux/loop.h>` that `libc` does not carry.

#![allow(dead_code)]

// <linux/fs.h>: block device ioctls (_IO(0x12, n) and _IOR(0x12, 114, size_t)).
pub(crate) const BLKROGET: libc::c_ulong = 0x125E;
pub(crate) const BLKFLSBUF: libc::c_ulong = 0x1261;
pub(crate) const BLKSSZGET: libc::c_ulong = 0x1268;
pub(crate) const BLKDISCARD: libc::c_ulong = 0x1277;
pub(crate) const BLKPBSZGET: libc::c_ulong = 0x127B;
pub(crate) const BLKZEROOUT: libc::c_ulong = 0x127F;
pub(crate) const BLKGETSIZE64: libc::c_ulong =
    0x8000_1272 | ((std::mem::size_of::<usize>() as libc::c_ulong) << 16);

// <linux/loop.h>
pub(crate) const LOOP_SET_FD: libc::c_ulong = 0x4C00;
pub(crate) const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
pub(crate) const LOOP_SET_STATUS64: libc::c_ulong = 0x4C04;
pub(crate) const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;
pub(crate) const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
pub(crate) const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;

pub(crate) const LO_FLAGS_READ_ONLY: u32 = 1;
pub(crate) const LO_FLAGS_AUTOCLEAR: u32 = 4;
pub(crate) const LO_FLAGS_DIRECT_IO: u32 = 16;

/// The block major of loop devices.
pub(crate) const LOOP_MAJOR: u32 = 7;

pub(crate) const LO_NAME_SIZE: usize = 64;
pub(crate) const LO_KEY_SIZE: usize = 32;

/// `struct loop_info64`.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct LoopInfo64 {
    pub lo_device: u64,
    pub lo_inode: u64,
    pub lo_rdevice: u64,
    pub lo_offset: u64,
    pub lo_sizelimit: u64,
    pub lo_number: u32,
    pub lo_encrypt_type: u32,
    pub lo_encrypt_key_size: u32,
    pub lo_flags: u32,
    pub lo_file_name: [u8; LO_NAME_SIZE],
    pub lo_crypt_name: [u8; LO_NAME_SIZE],
    pub lo_encrypt_key: [u8; LO_KEY_SIZE],
    pub lo_init: [u64; 2],
}

impl LoopInfo64 {
    pub(crate) fn zeroed() -> Self {
        Self {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: 0,
            lo_file_name: [0; LO_NAME_SIZE],
            lo_crypt_name: [0; LO_NAME_SIZE],
            lo_encrypt_key: [0; LO_KEY_SIZE],
            lo_init: [0; 2],
        }
    }
}

/// `struct loop_config` (LOOP_CONFIGURE, Linux 5.8+).
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct LoopConfig {
    pub fd: u32,
    pub block_size: u32,
    pub info: LoopInfo64,
    pub reserved: [u64; 8],
}

const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);
const _: () = assert!(std::mem::size_of::<LoopConfig>() == 304);
