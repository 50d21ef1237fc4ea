//! A small tmpfs for tests that fill a file system (needs root to mount).
#![allow(dead_code)]

/// A tmpfs of `size` mounted on a new directory, unmounted when dropped.
pub struct SmallFs {
    pub dir: tempfile::TempDir,
}

impl SmallFs {
    pub fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = std::ffi::CString::new(dir.path().as_os_str().as_encoded_bytes())
            .expect("path without NUL");
        let fstype = std::ffi::CString::new("tmpfs").expect("no NUL");
        let data = std::ffi::CString::new(format!("size={size}")).expect("no NUL");
        // SAFETY: every pointer is a valid NUL-terminated string that outlives the call.
        let rc = unsafe {
            libc::mount(
                fstype.as_ptr(),
                path.as_ptr(),
                fstype.as_ptr(),
                0,
                data.as_ptr().cast(),
            )
        };
        assert_eq!(
            rc,
            0,
            "mount tmpfs (needs root): {}",
            std::io::Error::last_os_error()
        );
        Self { dir }
    }

    /// Writes zeros into a file until the file system is full.
    pub fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.dir.path().join("filler");
        let mut f = std::fs::File::create(&path).expect("filler");
        let chunk = vec![0u8; 4096];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
        path
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let path = std::ffi::CString::new(self.dir.path().as_os_str().as_encoded_bytes())
            .expect("path without NUL");
        // SAFETY: a valid NUL-terminated path; only the tmpfs this value mounted is unmounted.
        unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
    }
}
