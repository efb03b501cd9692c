//! The bundled sample model: an MLP trained by `prunescope train` on the bundled digits.

use crate::model::{Model, ModelError};

pub const SAMPLE_NAME: &str = "digits_mlp.safetensors (bundled sample)";
static SAMPLE_BYTES: &[u8] = include_bytes!("../sample_models/digits_mlp.safetensors");

/// Opens the sample from the bytes compiled into the binary, so it works from any directory.
pub fn open_sample() -> Result<Model, ModelError> {
    Model::from_static_safetensors(SAMPLE_NAME, SAMPLE_BYTES)
}
