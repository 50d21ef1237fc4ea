//! The memory allocator of the daemon (and of every test binary linking this library): jemalloc, for every
//! allocation of the process (Rust's and SQLite's), with freed memory handed back to the system within about
//! a second.
//!
//! Why not glibc's malloc: a listing reads rows on SQLite's worker thread and frees them on a runtime thread.
//! glibc frees a block into the arena that allocated it, under that arena's lock, so both threads queued on
//! one lock; at 10,000 volumes a third of `GET /volumes` was spent waiting for it (450 ms, against 160 ms
//! with jemalloc), and glibc kept the freed memory of its arenas (the daemon stayed 30 MB larger after one
//! large listing). jemalloc frees into per-thread caches and returns unused pages from a background thread
//! after `dirty_decay_ms`.
//!
//! The options below are jemalloc's compiled-in defaults for this binary; `MALLOC_CONF` in the environment
//! still overrides them (see jemalloc(3)).

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options (a C string, read once at start-up): one background thread (jemalloc would start one per
/// CPU) returns freed pages to the system gradually over the half second after they are freed, with no second,
/// "muzzy", stage in between.
#[export_name = "malloc_conf"]
pub static MALLOC_CONF: &[u8; 84] =
    b"background_thread:true,max_background_threads:1,dirty_decay_ms:500,muzzy_decay_ms:0\0";

#[cfg(test)]
mod tests {
    /// jemalloc's `opt.NAME`.
    fn opt<T: Copy>(name: &str) -> T {
        let key = format!("opt.{name}\0");
        // SAFETY: each name below is one of jemalloc's `opt.*` keys whose value has type T.
        unsafe { tikv_jemalloc_ctl::raw::read::<T>(key.as_bytes()) }
            .unwrap_or_else(|e| panic!("reading jemalloc option {name}: {e}"))
    }

    #[test]
    fn jemalloc_serves_the_process_with_the_compiled_in_options() {
        // These are read from jemalloc itself: the options symbol was linked in and parsed.
        assert!(opt::<bool>("background_thread"));
        assert_eq!(opt::<usize>("max_background_threads"), 1);
        assert_eq!(opt::<isize>("dirty_decay_ms"), 500);
        assert_eq!(opt::<isize>("muzzy_decay_ms"), 0);
        // C code's malloc is jemalloc's too: a block from libc's malloc has jemalloc's usable size.
        // SAFETY: a plain malloc/free pair; the pointer is checked before use.
        unsafe {
            let p = libc::malloc(100);
            assert!(!p.is_null());
            assert_eq!(tikv_jemallocator::usable_size(p.cast_const()), 112);
            libc::free(p);
        }
    }
}
