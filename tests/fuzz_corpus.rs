//! Every input the fuzzers kept (`fuzz/corpus/TARGET/`) and every crash they ever found
//! (`fuzz/regressions/TARGET/`) runs through the same entry points as the fuzz targets, on
//! stable, in `cargo test`: a loader change that brings back a crash fails here even where
//! the nightly fuzzing step cannot run.

use std::path::Path;

use prunescope::fuzzing;
use prunescope::model::ModelFormat;

fn replay(target: &str, run: impl Fn(&[u8])) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut n = 0;
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for e in entries {
            let path = e.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&bytes)));
            assert!(r.is_ok(), "{target}: {} panicked", path.display());
            n += 1;
        }
    }
    n
}

#[test]
fn fuzz_corpora_and_regressions_replay_without_a_panic() {
    let counts = [
        (
            "safetensors",
            replay("safetensors", |d| {
                fuzzing::load_and_touch(ModelFormat::Safetensors, d)
            }),
        ),
        (
            "npz",
            replay("npz", |d| fuzzing::load_and_touch(ModelFormat::Npz, d)),
        ),
        (
            "pytorch",
            replay("pytorch", |d| {
                fuzzing::load_and_touch(ModelFormat::PyTorch, d)
            }),
        ),
        ("pickle", replay("pickle", fuzzing::pickle_in_archive)),
        (
            "onnx",
            replay("onnx", |d| fuzzing::load_and_touch(ModelFormat::Onnx, d)),
        ),
        ("recipe", replay("recipe", fuzzing::recipe)),
    ];
    for (target, n) in counts {
        assert!(n > 0, "no corpus for {target}");
        eprintln!("{target}: {n} inputs replayed");
    }
}
