//! Recipes: the settings that produced a result, plus which file they were applied to, so the
//! CLI can replay a GUI session and produce byte-identical weights.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::model::Model;
use crate::prune::{Allocation, PruneSettings};

pub const RECIPE_FORMAT: &str = "prunescope-recipe/1";

/// Recipes are settings, not data: even one with a line for each of a million tensors is far
/// below this.
const MAX_RECIPE_BYTES: u64 = 256 << 20;

/// Reads a regular file of at most `max` bytes as UTF-8 (never blocks on a FIFO).
fn read_small_text(path: &Path, max: u64) -> Result<String, String> {
    use std::io::Read;
    let f = crate::model::open_regular_file(path).map_err(|e| match e {
        crate::model::ModelError::Io { error, .. } => crate::util::io_message(&error),
        crate::model::ModelError::Format { msg, .. } => msg,
        other => other.to_string(),
    })?;
    let mut text = String::new();
    f.take(max + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("not a text file: {}", crate::util::io_message(&e)))?;
    if text.len() as u64 > max {
        return Err(format!("larger than {max} bytes: not a recipe"));
    }
    Ok(text)
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecipeInput {
    /// File name of the model the recipe was made on (informational).
    pub file: String,
    /// SHA-256 of that file; replay refuses a different file unless told otherwise.
    pub sha256: String,
}

/// What the recipe produced, per tensor, so a replay can check it got the same.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerResult {
    pub numel: usize,
    pub pruned: usize,
    pub sparsity: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Recipe {
    pub format: String,
    pub input: RecipeInput,
    pub settings: PruneSettings,
    pub result: BTreeMap<String, LayerResult>,
}

#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("{path}: {msg}")]
    Read { path: String, msg: String },
    #[error(
        "recipe was made on {expected_file} (sha256 {expected}), but this model's sha256 is {actual}; pass --ignore-hash to apply it anyway"
    )]
    HashMismatch {
        expected_file: String,
        expected: String,
        actual: String,
    },
    #[error("replay pruned {actual} weights of '{tensor}' but the recipe recorded {expected}")]
    ResultMismatch {
        tensor: String,
        expected: usize,
        actual: usize,
    },
}

impl Recipe {
    pub fn new(
        model: &Model,
        sha256: String,
        settings: &PruneSettings,
        alloc: &Allocation,
    ) -> Recipe {
        let result = alloc
            .layers
            .iter()
            .map(|l| {
                (
                    model.tensors[l.tensor].name.clone(),
                    LayerResult {
                        numel: l.numel,
                        pruned: l.pruned,
                        sparsity: l.sparsity(),
                    },
                )
            })
            .collect();
        Recipe {
            format: RECIPE_FORMAT.to_string(),
            input: RecipeInput {
                file: model.display_name(),
                sha256,
            },
            settings: settings.clone(),
            result,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("recipes always serialise")
    }

    pub fn load(path: &Path) -> Result<Recipe, RecipeError> {
        let err = |msg: String| RecipeError::Read {
            path: path.display().to_string(),
            msg,
        };
        let text = read_small_text(path, MAX_RECIPE_BYTES).map_err(err)?;
        Recipe::parse(&text).map_err(err)
    }

    /// Parses recipe JSON and checks its format tag (the settings are checked against a model
    /// by [`PruneSettings::validate`] when applied).
    pub fn parse(text: &str) -> Result<Recipe, String> {
        let r: Recipe =
            serde_json::from_str(text).map_err(|e| format!("not a valid recipe: {e}"))?;
        if r.format != RECIPE_FORMAT {
            return Err(format!("format '{}' is not '{RECIPE_FORMAT}'", r.format));
        }
        Ok(r)
    }

    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        crate::util::atomic_write(path, |w| {
            std::io::Write::write_all(w, self.to_json().as_bytes())
        })
    }

    pub fn check_hash(&self, actual: &str) -> Result<(), RecipeError> {
        if self.input.sha256 != actual {
            return Err(RecipeError::HashMismatch {
                expected_file: self.input.file.clone(),
                expected: self.input.sha256.clone(),
                actual: actual.to_string(),
            });
        }
        Ok(())
    }

    /// Checks that a replay's allocation matches what the recipe recorded.
    pub fn check_result(&self, model: &Model, alloc: &Allocation) -> Result<(), RecipeError> {
        for l in &alloc.layers {
            let name = &model.tensors[l.tensor].name;
            if let Some(r) = self.result.get(name)
                && r.pruned != l.pruned
            {
                return Err(RecipeError::ResultMismatch {
                    tensor: name.clone(),
                    expected: r.pruned,
                    actual: l.pruned,
                });
            }
        }
        Ok(())
    }
}
