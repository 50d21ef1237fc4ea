//! A server's write fence: a deadline after which no request that changes or commits an export's data
//! (WRITE, WRITE_ZEROES, TRIM, FLUSH) is run, each answered `ESHUTDOWN`, for an embedder whose right to
//! write lapses unless it is renewed (the daemon's appliance lease: another daemon may take the device over
//! once the lease has expired, before this one has noticed, e.g. after the process was frozen).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Until when writes are run; moved forward with each renewal of the right to write.
#[derive(Debug)]
pub struct WriteFence {
    epoch: Instant,
    /// Milliseconds after `epoch` until which writes are run.
    until_ms: AtomicU64,
}

impl WriteFence {
    /// Writes are run until `until`.
    pub fn new(until: Instant) -> Self {
        let epoch = Instant::now();
        let fence = WriteFence {
            epoch,
            until_ms: AtomicU64::new(0),
        };
        fence.extend_to(until);
        fence
    }

    /// Writes are run until `until`, when that is later than the current deadline (a renewal that took
    /// long to come back never shortens one that came back since).
    pub fn extend_to(&self, until: Instant) {
        let ms = u64::try_from(until.saturating_duration_since(self.epoch).as_millis())
            .unwrap_or(u64::MAX);
        self.until_ms.fetch_max(ms, Ordering::AcqRel);
    }

    /// No more writes from now on, for good.
    pub fn close(&self) {
        self.until_ms.store(0, Ordering::Release);
    }

    /// Whether a write may run now.
    pub fn open(&self) -> bool {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        now < self.until_ms.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn writes_run_until_the_deadline_which_only_moves_forward_until_closed() {
        let f = WriteFence::new(Instant::now() + Duration::from_secs(60));
        assert!(f.open());
        f.extend_to(Instant::now());
        assert!(f.open(), "an earlier deadline does not shorten a later one");
        f.close();
        assert!(!f.open());
        let f = WriteFence::new(Instant::now() + Duration::from_millis(30));
        assert!(f.open());
        std::thread::sleep(Duration::from_millis(40));
        assert!(!f.open(), "past the deadline");
        f.extend_to(Instant::now() + Duration::from_secs(5));
        assert!(f.open(), "renewed");
    }
}
