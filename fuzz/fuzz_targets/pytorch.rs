//! Whole torch.save archives: zip, pickle, storage records and views.
#![no_main]
use libfuzzer_sys::fuzz_target;
use prunescope::model::ModelFormat;

fuzz_target!(|data: &[u8]| {
    prunescope::fuzzing::load_and_touch(ModelFormat::PyTorch, data);
});
