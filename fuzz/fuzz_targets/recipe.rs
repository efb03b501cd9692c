//! Recipe JSON: parsing, then applying the settings to a small model.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    prunescope::fuzzing::recipe(data);
});
