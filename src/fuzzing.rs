//! Entry points for the fuzz targets in `fuzz/`, shared with the corpus replay in `cargo test`
//! (tests/fuzz_corpus.rs), so that every input the fuzzer kept or found runs on stable too.
//!
//! Each takes arbitrary bytes and must return without panicking; what it loads it also uses
//! (decodes, histograms, prunes, exports to memory), so that a loader that accepts a lie is
//! caught where the lie would bite.

use crate::analysis::histogram;
use crate::export::Recipe;
use crate::model::{Model, ModelFormat};
use crate::progress::Progress;
use crate::prune::{PruneSettings, ScoreInputs, prune};

/// Loads `data` as `format`; if it loads, checks and uses every tensor.
pub fn load_and_touch(format: ModelFormat, data: &[u8]) {
    if let Ok(m) = Model::from_bytes("fuzz", format, data.to_vec()) {
        touch(&m);
    }
}

fn touch(m: &Model) {
    if m.format == ModelFormat::Onnx {
        // The pruned-ONNX writer re-reads the file: what loaded must re-read the same.
        let inits = crate::model::onnx_io::initializers(m.backing_bytes());
        assert_eq!(inits.map(|v| v.len()).ok(), Some(m.tensors.len()));
        // The graph importer reads nodes, attributes and constants the loader never looks at;
        // what it accepts must pass the graph's own checks.
        if let Ok(g) = crate::eval::import_onnx_graph(m) {
            assert!(g.check(m).is_ok(), "an imported graph failed its own check");
        }
    }
    for (t, e) in m.tensors.iter().enumerate() {
        let bytes = m.tensor_bytes(t);
        if let Some(size) = e.dtype.size_bytes() {
            assert_eq!(bytes.len(), e.numel * size, "tensor {} byte length", e.name);
        }
        assert_eq!(
            e.shape.iter().product::<usize>(),
            e.numel,
            "tensor {} numel",
            e.name
        );
        if e.analysable() {
            let h = histogram(m, t, 8);
            let total = h.counts.iter().sum::<u64>() + h.non_finite();
            assert_eq!(total, e.numel as u64, "tensor {} histogram total", e.name);
        }
    }
    let settings = PruneSettings {
        sparsity: 0.5,
        ..Default::default()
    };
    if let Ok(p) = prune(m, &settings, &ScoreInputs::default(), &Progress::none()) {
        let mut sink = std::io::sink();
        let specs = crate::export::tensor_specs(m);
        let _ = crate::export::write_safetensors(&mut sink, &m.metadata, &specs, |t, w| {
            std::io::Write::write_all(w, m.tensor_bytes(t))
        });
        assert!(p.masks.len() <= m.tensors.len());
    }
}

/// `data` as the `data.pkl` of an otherwise valid torch.save archive with two 64-byte storages.
pub fn pickle_in_archive(data: &[u8]) {
    let storage = [0x3fu8; 64];
    let zip = crate::model::zip::write_stored_zip(&[
        ("archive/data.pkl", data),
        ("archive/byteorder", b"little"),
        ("archive/data/0", &storage),
        ("archive/data/1", &storage),
    ]);
    load_and_touch(ModelFormat::PyTorch, &zip);
}

/// `data` as recipe JSON, applied to a small model.
pub fn recipe(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(r) = Recipe::parse(text) else {
        return;
    };
    let model = Model::from_f32_tensors(
        "fuzz",
        vec![
            (
                "fc1.weight".into(),
                vec![4, 8],
                (0..32).map(|i| i as f32 - 16.0).collect(),
            ),
            ("fc1.bias".into(), vec![4], vec![0.5; 4]),
            (
                "fc2.weight".into(),
                vec![3, 4],
                (0..12).map(|i| (i * 7 % 5) as f32).collect(),
            ),
        ],
    );
    if let Ok(p) = prune(
        &model,
        &r.settings,
        &ScoreInputs::default(),
        &Progress::none(),
    ) {
        assert!(p.alloc.pruned <= p.alloc.prunable);
    }
}
