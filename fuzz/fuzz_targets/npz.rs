//! NumPy archives: the zip reader, bounded inflation, the .npy header parser and the layout
//! rewrites (Fortran order, big-endian).
#![no_main]
use libfuzzer_sys::fuzz_target;
use prunescope::model::ModelFormat;

fuzz_target!(|data: &[u8]| {
    prunescope::fuzzing::load_and_touch(ModelFormat::Npz, data);
});
