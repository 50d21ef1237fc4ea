//! Serialization of operations: a FIFO queue per volume (operations on one volume run one at a time, in the
//! order they were accepted) and a mutex per VM (attach/detach on one VM never overlap).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// FIFO turn-taking per key. [`Queues::enqueue`] is synchronous, so the order of calls is the order of turns.
#[derive(Debug, Default)]
pub struct Queues {
    tails: Mutex<HashMap<String, (u64, watch::Receiver<()>)>>,
    next_id: std::sync::atomic::AtomicU64,
}

/// A place in a key's queue; dropping it lets the next one run, but never before every earlier place has
/// finished: a place given up while it waited (a request whose client went away, a cancelled wait) hands
/// its wait on to the next one.
#[derive(Debug)]
pub struct Turn {
    queues: Arc<Queues>,
    key: String,
    id: u64,
    /// The place before this one, until [`Turn::wait`] saw it finish.
    previous: Option<watch::Receiver<()>>,
    /// Dropped when this place is done (the next place waits for that).
    done: Option<watch::Sender<()>>,
}

impl Queues {
    /// Takes the next place in `key`'s queue.
    pub fn enqueue(self: &Arc<Self>, key: &str) -> Turn {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = watch::channel(());
        let mut tails = self.tails.lock().expect("queue map lock poisoned");
        let previous = tails.insert(key.to_string(), (id, rx)).map(|(_, r)| r);
        Turn {
            queues: Arc::clone(self),
            key: key.to_string(),
            id,
            previous,
            done: Some(tx),
        }
    }

    /// Number of keys with a queue (tests check that finished queues are dropped).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.tails.lock().expect("queue map lock poisoned").len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Turn {
    /// Waits until every earlier place in the queue has finished.
    pub async fn wait(&mut self) {
        if let Some(prev) = self.previous.as_mut() {
            // The sender is dropped when the previous turn finishes; `changed` then returns Err. Cancelled
            // here, the turn keeps `previous`, and its drop waits for it.
            while prev.changed().await.is_ok() {}
        }
        self.previous = None;
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        {
            let mut tails = self.queues.tails.lock().expect("queue map lock poisoned");
            if tails.get(&self.key).map(|(id, _)| *id) == Some(self.id) {
                tails.remove(&self.key);
            }
        }
        // Given up before its turn came: the next place runs only once the previous one has finished.
        if let (Some(mut prev), Some(done)) = (self.previous.take(), self.done.take()) {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    while prev.changed().await.is_ok() {}
                    drop(done);
                });
            }
        }
    }
}

/// One async mutex per key, created on demand and dropped when unused.
#[derive(Debug, Default)]
pub struct KeyedMutex {
    map: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Holds a key's mutex.
#[derive(Debug)]
pub struct KeyGuard {
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

impl KeyedMutex {
    pub async fn lock(&self, key: &str) -> KeyGuard {
        let m = {
            let mut map = self.map.lock().expect("keyed mutex map lock poisoned");
            map.retain(|_, m| Arc::strong_count(m) > 1 || m.try_lock().is_err());
            Arc::clone(map.entry(key.to_string()).or_default())
        };
        KeyGuard {
            _guard: m.lock_owned().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn turns_run_in_enqueue_order() {
        let q = Arc::new(Queues::default());
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut handles = Vec::new();
        for i in 0..10u32 {
            let mut turn = q.enqueue("v");
            let log = Arc::clone(&log);
            handles.push(tokio::spawn(async move {
                // Later turns try to jump the queue by not sleeping.
                tokio::time::sleep(Duration::from_millis(u64::from(10 - i))).await;
                turn.wait().await;
                log.lock().unwrap().push(i);
                tokio::time::sleep(Duration::from_millis(1)).await;
                drop(turn);
            }));
        }
        for h in handles {
            h.await.unwrap();
        }
        assert_eq!(*log.lock().unwrap(), (0..10).collect::<Vec<_>>());
        assert!(q.is_empty());
    }

    #[tokio::test]
    async fn a_place_given_up_before_its_turn_keeps_the_next_waiting() {
        let q = Arc::new(Queues::default());
        let first = q.enqueue("v");
        // The second place is given up while it waits (its request's client went away) ...
        let mut second = q.enqueue("v");
        let mut third = q.enqueue("v");
        let waiting = tokio::spawn(async move { second.wait().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        waiting.abort();
        let _ = waiting.await;
        // ... and one never waited for at all.
        let fourth = q.enqueue("v");
        let mut fifth = q.enqueue("v");
        drop(fourth);
        // The third and fifth still wait for the first.
        assert!(
            tokio::time::timeout(Duration::from_millis(100), third.wait())
                .await
                .is_err(),
            "the third place ran while the first was running"
        );
        drop(first);
        tokio::time::timeout(Duration::from_secs(5), third.wait())
            .await
            .expect("the third place runs once the first finished");
        assert!(
            tokio::time::timeout(Duration::from_millis(100), fifth.wait())
                .await
                .is_err(),
            "the fifth place ran while the third was running"
        );
        drop(third);
        tokio::time::timeout(Duration::from_secs(5), fifth.wait())
            .await
            .expect("the fifth place runs once the third finished");
    }

    #[tokio::test]
    async fn keyed_mutex_excludes_per_key_only() {
        let m = Arc::new(KeyedMutex::default());
        let a = m.lock("a").await;
        // Another key is free.
        let _b = m.lock("b").await;
        let m2 = Arc::clone(&m);
        let waiter = tokio::spawn(async move {
            let _g = m2.lock("a").await;
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(a);
        waiter.await.unwrap();
    }
}
