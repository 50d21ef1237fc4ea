//! The state store at scale: creating volumes over HTTP keeps its rate from 100 to 10,000 volumes, since
//! each change appends one synced log line instead of rewriting the whole state.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Harness;

const TOTAL: usize = 10_000;
/// Rates are taken per block of this many creations...
const BLOCK: usize = 100;
/// ...and compared as the median block rate over the first and the last window of this many.
const WINDOW: usize = 1_000;
const CREATORS: usize = 8;

/// Median creations per second over the blocks of `done[from..from + WINDOW]`; the median keeps one
/// block slowed by a neighbour's build (or by a log compaction) from deciding the comparison.
fn median_rate(done: &[Duration], from: usize) -> f64 {
    let mut rates: Vec<f64> = (from..from + WINDOW)
        .step_by(BLOCK)
        .map(|b| BLOCK as f64 / (done[b + BLOCK - 1] - done[b - 1]).as_secs_f64())
        .collect();
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creation_rate_stays_flat_from_100_to_10000_volumes() {
    let h = Arc::new(Harness::start_with(|c| c.job_delay = Duration::ZERO).await);
    let custom = h
        .sim
        .disk_offerings()
        .into_iter()
        .find(|o| o.2.is_none())
        .expect("custom offering")
        .0;
    let zone = h.sim.zone_id().to_owned();
    let next = Arc::new(AtomicUsize::new(0));
    // done_at[i]: when the i-th creation (in completion order) was answered.
    let done = Arc::new(std::sync::Mutex::new(Vec::with_capacity(TOTAL)));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CREATORS {
        let (h, next, done, custom, zone) = (
            Arc::clone(&h),
            Arc::clone(&next),
            Arc::clone(&done),
            custom.clone(),
            zone.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::SeqCst);
                if n >= TOTAL {
                    return;
                }
                let name = format!("scale-{n}");
                h.ok(
                    "createVolume",
                    &[
                        ("name", &name),
                        ("zoneid", &zone),
                        ("diskofferingid", &custom),
                        ("size", "1"),
                    ],
                )
                .await;
                done.lock().expect("lock").push(start.elapsed());
            }
        }));
    }
    for t in tasks {
        t.await.expect("creator");
    }
    let done = done.lock().expect("lock").clone();
    assert_eq!(done.len(), TOTAL);
    let early = median_rate(&done, 100);
    let late = median_rate(&done, TOTAL - WINDOW);
    let mean =
        |from: usize, to: usize| (to - from) as f64 / (done[to - 1] - done[from - 1]).as_secs_f64();
    eprintln!(
        "createVolume over HTTP, median of {BLOCK}-volume blocks: {early:.0}/s at 100-{} volumes, \
         {late:.0}/s at {}-{TOTAL} volumes (means {:.0}/s and {:.0}/s); {TOTAL} in {:.1} s",
        100 + WINDOW,
        TOTAL - WINDOW,
        mean(100, 100 + WINDOW),
        mean(TOTAL - WINDOW, TOTAL),
        done[TOTAL - 1].as_secs_f64()
    );
    // A store that rewrites everything per change slows 7x from 100 to 1,000 volumes (and ~70x by
    // 10,000); a third leaves room for a neighbour's build running during one window only.
    assert!(
        late >= early / 3.0,
        "creation slowed from {early:.0}/s to {late:.0}/s as volumes grew"
    );
    // Every volume is there, and survives a restart.
    let listed = h
        .ok("listVolumes", &[("keyword", "scale-"), ("pagesize", "-1")])
        .await;
    assert_eq!(listed["count"], TOTAL);
    let h = Arc::into_inner(h).expect("creators are done");
    let Harness { dir, sim, http } = h;
    sim.shutdown().await;
    let started = Instant::now();
    let sim = cloudsim::Simulator::start(common::config(&dir))
        .await
        .expect("restart");
    eprintln!(
        "restart with {TOTAL} volumes took {:.0} ms",
        started.elapsed().as_secs_f64() * 1000.0
    );
    let h = Harness { dir, sim, http };
    let listed = h
        .ok("listVolumes", &[("keyword", "scale-"), ("pagesize", "-1")])
        .await;
    assert_eq!(listed["count"], TOTAL);
    h.sim.shutdown().await;
}
