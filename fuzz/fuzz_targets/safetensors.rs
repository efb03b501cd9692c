//! The safetensors header and layout checks: any bytes either load or give an error, and every
//! tensor of a loaded model decodes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use prunescope::model::ModelFormat;

fuzz_target!(|data: &[u8]| {
    prunescope::fuzzing::load_and_touch(ModelFormat::Safetensors, data);
});
