//! ONNX models exported by PyTorch (tools/make_onnx_fixtures.py): their initializers load with
//! the values onnx's own reader gives, prune to the same masks as the same weights in
//! safetensors, and export to an .onnx that differs from the input only in pruned values.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use prunescope::export::{export_onnx, write_f32_safetensors};
use prunescope::model::{Model, ModelFormat};
use prunescope::progress::Progress;
use prunescope::prune::{PruneSettings, ScoreInputs, prune};

fn onnx(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/onnx")
        .join(name)
}

/// name → (dims, values) as onnx.numpy_helper read them.
fn recorded(model: &str) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let json = onnx(model).with_extension("json");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    v["initializers"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, t)| {
            let dims = serde_json::from_value(t["dims"].clone()).unwrap();
            let values = t["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            (k.clone(), (dims, values))
        })
        .collect()
}

#[test]
fn pytorch_exports_load_with_the_values_onnx_reads() {
    for f in [
        "mlp_opset13.onnx",
        "mlp_opset17.onnx",
        "cnn_bn_residual_opset17.onnx",
        "mlp_external.onnx",
    ] {
        let m = Model::open(&onnx(f)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(m.format, ModelFormat::Onnx);
        let want = recorded(f);
        assert_eq!(m.tensors.len(), want.len(), "{f}");
        for (name, (dims, values)) in want {
            let t = m.find(&name).unwrap_or_else(|| panic!("{f}: {name}"));
            assert_eq!(m.tensors[t].shape, dims, "{f}: {name}");
            assert_eq!(m.to_f32_vec(t), values, "{f}: {name}");
        }
    }
}

#[test]
fn an_onnx_model_prunes_exactly_as_its_weights_in_safetensors() {
    let dir = common::tempdir("onnx-same");
    let want = recorded("cnn_bn_residual_opset17.onnx");
    let st = dir.join("cnn.safetensors");
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> =
        want.into_iter().map(|(k, (d, v))| (k, d, v)).collect();
    write_f32_safetensors(&st, &BTreeMap::new(), &tensors).unwrap();
    let a = Model::open(&onnx("cnn_bn_residual_opset17.onnx")).unwrap();
    let b = Model::open(&st).unwrap();
    for sparsity in [0.3, 0.5, 0.9] {
        let s = PruneSettings {
            sparsity,
            ..Default::default()
        };
        let pa = prune(&a, &s, &ScoreInputs::default(), &Progress::none()).unwrap();
        let pb = prune(&b, &s, &ScoreInputs::default(), &Progress::none()).unwrap();
        assert_eq!(pa.masks, pb.masks, "sparsity {sparsity}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_pruned_onnx_differs_from_its_input_only_in_pruned_values() {
    let dir = common::tempdir("onnx-export");
    for f in ["mlp_opset13.onnx", "cnn_bn_residual_opset17.onnx"] {
        let input = Model::open(&onnx(f)).unwrap();
        let s = PruneSettings {
            sparsity: 0.6,
            ..Default::default()
        };
        let p = prune(&input, &s, &ScoreInputs::default(), &Progress::none()).unwrap();
        let out = dir.join(f);
        export_onnx(&input, &p.masks, &out, &Progress::none()).unwrap();
        let (a, b) = (
            std::fs::read(onnx(f)).unwrap(),
            std::fs::read(&out).unwrap(),
        );
        assert_eq!(a.len(), b.len(), "{f}: same length");
        // Every changed byte was part of a pruned weight that is now zero: count the zeroed
        // 4-byte values independently of our reader, by scanning the two files.
        let changed: Vec<usize> = (0..a.len()).filter(|&i| a[i] != b[i]).collect();
        let pruned_nonzero: usize = p
            .masks
            .iter()
            .map(|(name, mask)| {
                let t = input.find(name).unwrap();
                let v = input.to_f32_vec(t);
                (0..v.len())
                    .filter(|&i| !mask.kept(i) && v[i].to_bits() != 0)
                    .count()
            })
            .sum();
        assert!(changed.len() <= pruned_nonzero * 4, "{f}");
        for &i in &changed {
            assert_eq!(
                b[i], 0,
                "{f}: byte {i} changed to something other than zero"
            );
        }
        // And read back, the pruned model is the input times the masks.
        let back = Model::open(&out).unwrap();
        for (t, e) in input.tensors.iter().enumerate() {
            let (orig, now) = (
                input.to_f32_vec(t),
                back.to_f32_vec(back.find(&e.name).unwrap()),
            );
            match p.masks.get(&e.name) {
                None => assert_eq!(orig, now, "{f}: {} untouched", e.name),
                Some(mask) => {
                    for i in 0..orig.len() {
                        let want = if mask.kept(i) { orig[i] } else { 0.0 };
                        assert_eq!(now[i].to_bits(), want.to_bits(), "{f}: {}[{i}]", e.name);
                    }
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_cli_writes_onnx_or_safetensors_by_the_output_name() {
    let dir = common::tempdir("onnx-cli");
    // `prune MODEL --sparsity 0.5 --out OUT [extra…]`
    let prune = |model: &Path, out: &str, extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_prunescope"))
            .args([
                "prune",
                model.to_str().unwrap(),
                "--sparsity",
                "0.5",
                "--out",
            ])
            .arg(dir.join(out))
            .args(extra)
            .output()
            .unwrap()
    };
    let src = onnx("mlp_opset17.onnx");
    let masks = dir.join("m.safetensors");
    let o = prune(&src, "p.onnx", &["--masks", masks.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        Model::open(&dir.join("p.onnx")).unwrap().format,
        ModelFormat::Onnx
    );
    let o = prune(&src, "w.safetensors", &[]);
    assert!(o.status.success());
    let w = Model::open(&dir.join("w.safetensors")).unwrap();
    assert_eq!(w.tensors.len(), 4);
    // External data: the weights export works; an in-place .onnx cannot and says so.
    let ext = onnx("mlp_external.onnx");
    let o = prune(&ext, "e.safetensors", &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        Model::open(&dir.join("e.safetensors"))
            .unwrap()
            .tensors
            .len(),
        4
    );
    let o = prune(&ext, "e.onnx", &[]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains("external data") && e.contains(".safetensors"),
        "{e}"
    );
    // A non-ONNX model cannot become an .onnx.
    let npz = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny.npz");
    let o = prune(&npz, "n.onnx", &[]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("needs an ONNX model"));
    let _ = std::fs::remove_dir_all(&dir);
}
