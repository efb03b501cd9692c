//! Recipes: the settings that produced a result, plus which file they were applied to, so the
//! CLI can replay a GUI session and produce byte-identical weights.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::model::Model;
use crate::prune::{Allocation, PruneSettings};

pub const RECIPE_FORMAT: &str = "prunescope-recipe/1";

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
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let r: Recipe =
            serde_json::from_str(&text).map_err(|e| err(format!("not a valid recipe: {e}")))?;
        if r.format != RECIPE_FORMAT {
            return Err(err(format!(
                "format '{}' is not '{RECIPE_FORMAT}'",
                r.format
            )));
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
