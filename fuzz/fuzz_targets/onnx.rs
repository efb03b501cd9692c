//! ONNX models: the protobuf walker, initializer data checks and varint decoding.
#![no_main]
use libfuzzer_sys::fuzz_target;
use prunescope::model::ModelFormat;

fuzz_target!(|data: &[u8]| {
    prunescope::fuzzing::load_and_touch(ModelFormat::Onnx, data);
});
