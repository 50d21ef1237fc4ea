//! Reusable request buffers shared by every session of a server: WRITE payloads and READ reply data
//! are taken from here and given back once written, so a busy connection does not allocate (and have
//! the allocator map, fault in and unmap) a fresh buffer for every request.
//!
//! Buffers are kept in power-of-two size classes from 4 KiB to 2 MiB; larger requests allocate as
//! before. What the pool keeps is bounded by a byte cap, so the server's memory stays within its
//! in-flight budget plus that cap.

use std::sync::Mutex;

/// Smallest class: 4 KiB.
const MIN_SHIFT: u32 = 12;
/// Largest class: 2 MiB.
const MAX_SHIFT: u32 = 21;
const CLASSES: usize = (MAX_SHIFT - MIN_SHIFT + 1) as usize;

/// Bytes the pool keeps by default.
pub(crate) const DEFAULT_POOL_BYTES: usize = 32 * 1024 * 1024;

#[derive(Debug)]
pub(crate) struct BufPool {
    inner: Mutex<Classes>,
    max_bytes: usize,
}

#[derive(Debug, Default)]
struct Classes {
    free: [Vec<Vec<u8>>; CLASSES],
    kept: usize,
}

/// The class that holds buffers of capacity at least `len`, if any.
fn class_for_len(len: usize) -> Option<usize> {
    let size = len.max(1 << MIN_SHIFT).checked_next_power_of_two()?;
    let shift = size.trailing_zeros();
    (shift <= MAX_SHIFT).then(|| (shift - MIN_SHIFT) as usize)
}

/// The class a buffer of capacity `cap` is kept in: the largest whose size it covers.
fn class_for_capacity(cap: usize) -> Option<usize> {
    if cap < 1 << MIN_SHIFT {
        return None;
    }
    let shift = (usize::BITS - 1 - cap.leading_zeros()).min(MAX_SHIFT);
    Some((shift - MIN_SHIFT) as usize)
}

impl BufPool {
    pub(crate) fn new(max_bytes: usize) -> Self {
        BufPool {
            inner: Mutex::new(Classes::default()),
            max_bytes,
        }
    }

    /// An empty buffer with capacity for at least `len` bytes.
    pub(crate) fn take(&self, len: usize) -> Vec<u8> {
        let Some(class) = class_for_len(len) else {
            return Vec::with_capacity(len);
        };
        if let Ok(mut c) = self.inner.lock() {
            if let Some(mut v) = c.free[class].pop() {
                c.kept -= v.capacity();
                v.clear();
                return v;
            }
        }
        Vec::with_capacity(1 << (class as u32 + MIN_SHIFT))
    }

    /// Gives a buffer back; it is kept if it fits a class and the cap, else freed.
    pub(crate) fn give(&self, v: Vec<u8>) {
        let cap = v.capacity();
        let Some(class) = class_for_capacity(cap) else {
            return;
        };
        if cap > 1 << MAX_SHIFT {
            return;
        }
        if let Ok(mut c) = self.inner.lock() {
            if c.kept + cap <= self.max_bytes {
                c.kept += cap;
                c.free[class].push(v);
            }
        }
    }

    /// Bytes currently kept for reuse.
    #[cfg(test)]
    fn kept(&self) -> usize {
        self.inner.lock().map(|c| c.kept).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_given_back_is_taken_again_for_a_request_of_its_class() {
        let pool = BufPool::new(1 << 20);
        let mut v = pool.take(5000);
        assert_eq!(v.capacity(), 8192);
        v.extend_from_slice(&[7u8; 5000]);
        let ptr = v.as_ptr();
        pool.give(v);
        assert_eq!(pool.kept(), 8192);
        let again = pool.take(8000);
        assert_eq!(again.as_ptr(), ptr, "the kept buffer is reused");
        assert!(again.is_empty(), "a reused buffer comes back empty");
        assert_eq!(pool.kept(), 0);
    }

    #[test]
    fn the_pool_keeps_no_more_than_its_cap_and_nothing_outside_its_classes() {
        let pool = BufPool::new(3 * 4096);
        for _ in 0..5 {
            pool.give(Vec::with_capacity(4096));
        }
        assert_eq!(pool.kept(), 3 * 4096);
        pool.give(Vec::with_capacity(100));
        pool.give(Vec::with_capacity(4 << 20));
        assert_eq!(pool.kept(), 3 * 4096);
        let big = pool.take(3 << 20);
        assert!(big.capacity() >= 3 << 20);
    }

    #[test]
    fn classes_cover_every_length_up_to_the_largest() {
        for len in [
            0,
            1,
            4095,
            4096,
            4097,
            65536,
            1 << 20,
            (1 << 21) - 1,
            1 << 21,
        ] {
            let c = class_for_len(len).expect("a class");
            assert!(1usize << (c as u32 + MIN_SHIFT) >= len);
        }
        assert_eq!(class_for_len((1 << 21) + 1), None);
        assert_eq!(
            class_for_capacity(12 * 1024),
            Some(1),
            "an odd size is kept in the class it covers"
        );
    }
}
