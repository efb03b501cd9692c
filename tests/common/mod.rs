//! What several test files share.

use std::path::PathBuf;

/// A fresh directory under the system temp dir, unique to this process and moment.
#[allow(dead_code)]
pub fn tempdir(tag: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let d = std::env::temp_dir().join(format!("prunescope-{tag}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Points the experiment history and the sensitivity cache at a directory of this test
/// process (the CLI children inherit it), never the user's.
#[allow(dead_code)]
pub fn isolate() {
    let dir = std::env::temp_dir().join(format!("prunescope-tests-{}", std::process::id()));
    // SAFETY: every caller sets the same values, so concurrent calls only write what is there.
    unsafe {
        std::env::set_var("PRUNESCOPE_CACHE_DIR", dir.join("cache"));
        std::env::set_var("PRUNESCOPE_DATA_DIR", dir.join("data"));
    }
}
