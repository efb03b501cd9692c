//! The bundled sample models, trained by `prunescope train` on the bundled digits and compiled
//! into the binary so they open from any directory. Each file's initial weights sit beside it in
//! `sample_models/` (`*.init.safetensors`).

use crate::model::{Model, ModelError};

pub const SAMPLE_NAME: &str = "digits_mlp.safetensors (bundled sample)";
static SAMPLE_BYTES: &[u8] = include_bytes!("../sample_models/digits_mlp.safetensors");

/// A bundled sample: a short id (`mlp`), a menu title and one sentence on what it teaches.
pub struct Sample {
    pub id: &'static str,
    pub title: &'static str,
    pub about: &'static str,
    name: &'static str,
    bytes: &'static [u8],
}

pub static SAMPLES: [Sample; 3] = [
    Sample {
        id: "mlp",
        title: "Digits MLP",
        about: "Two hidden layers of 128 and 64 units on the 8×8 digits: the simplest network \
                to prune, ~97% accurate dense.",
        name: SAMPLE_NAME,
        bytes: SAMPLE_BYTES,
    },
    Sample {
        id: "cnn",
        title: "Digits CNN",
        about: "Two 3×3 convolutions with max pooling and a linear classifier: see how \
                convolution kernels (4-D tensors) respond to pruning.",
        name: "digits_cnn.safetensors (bundled sample)",
        bytes: include_bytes!("../sample_models/digits_cnn.safetensors"),
    },
    Sample {
        id: "rescnn",
        title: "Digits residual CNN (BatchNorm)",
        about: "Convolutions with BatchNorm and a skip connection, as in ResNets: small, and \
                far more sensitive to pruning than the MLP.",
        name: "digits_rescnn.safetensors (bundled sample)",
        bytes: include_bytes!("../sample_models/digits_rescnn.safetensors"),
    },
];

/// Opens the MLP sample.
pub fn open_sample() -> Result<Model, ModelError> {
    Model::from_static_safetensors(SAMPLE_NAME, SAMPLE_BYTES)
}

/// Opens a sample by id (`mlp`, `cnn`, `rescnn`).
pub fn open_named(id: &str) -> Result<Model, ModelError> {
    let s = SAMPLES
        .iter()
        .find(|s| s.id == id)
        .ok_or_else(|| ModelError::Unsupported {
            path: format!("sample '{id}' (known: mlp, cnn, rescnn)"),
        })?;
    Model::from_static_safetensors(s.name, s.bytes)
}

/// The bundled samples' initial weights, by the file name their metadata gives.
static INIT_WEIGHTS: [(&str, &[u8]); 3] = [
    (
        "digits_mlp.init.safetensors",
        include_bytes!("../sample_models/digits_mlp.init.safetensors"),
    ),
    (
        "digits_cnn.init.safetensors",
        include_bytes!("../sample_models/digits_cnn.init.safetensors"),
    ),
    (
        "digits_rescnn.init.safetensors",
        include_bytes!("../sample_models/digits_rescnn.init.safetensors"),
    ),
];

/// The initial weights a model's metadata names (`prunescope.init_weights`): the file beside
/// it, or for a bundled sample (and models derived from one) the bundled copy.
pub fn init_weights_for(model: &Model) -> Option<Model> {
    let name = model.metadata.get("prunescope.init_weights")?;
    let file = std::path::Path::new(name).file_name()?;
    if let Some(dir) = model.source.path().and_then(|p| p.parent())
        && let Ok(m) = Model::open(&dir.join(file))
    {
        return Some(m);
    }
    let (n, bytes) = INIT_WEIGHTS
        .iter()
        .find(|(n, _)| std::ffi::OsStr::new(n) == file)?;
    Model::from_static_safetensors(n, bytes).ok()
}
