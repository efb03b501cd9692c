//! The pickle reader and the state-dict interpretation, with the input as `data.pkl` inside a
//! valid archive (so that mutations reach past the zip layer).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    prunescope::fuzzing::pickle_in_archive(data);
});
