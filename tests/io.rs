//! Loading every supported format, rejecting every kind of bad file with a clear message,
//! exporting, and the CLI contract (exit codes, one-line errors, byte-identical replays).

use std::path::{Path, PathBuf};
use std::process::Command;

use prunescope::export::{export_masks, export_pruned};
use prunescope::model::Model;
use prunescope::progress::Progress;
use prunescope::prune::{PruneSettings, ScoreInputs, prune};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("prunescope-io-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn close(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| (x - y).abs() <= 1e-5 * (1.0 + y.abs()))
}

fn tensor<'a>(m: &'a Model, name: &str) -> (usize, &'a prunescope::model::TensorEntry) {
    let t = m.find(name).unwrap_or_else(|| panic!("{name} missing"));
    (t, &m.tensors[t])
}

#[test]
fn pytorch_state_dicts_open_plain_and_nested() {
    for f in ["tiny_state_dict.pt", "nested_state_dict.pt"] {
        let m = Model::open(&fixture(f)).unwrap();
        let (t, e) = tensor(&m, "fc1.weight");
        assert_eq!(e.shape, vec![4, 6]);
        let want: Vec<f32> = (0..24).map(|i| i as f32 * 0.1 - 1.2).collect();
        assert!(close(&m.to_f32_vec(t), &want), "{f}");
        let (t, e) = tensor(&m, "fc2.weight");
        assert_eq!(e.dtype.to_string(), "F16");
        assert!(close(
            &m.to_f32_vec(t),
            &(0..8).map(|i| i as f32 * 0.5 - 2.0).collect::<Vec<_>>()
        ));
        let (_, steps) = tensor(&m, "steps");
        assert!(
            !steps.analysable(),
            "integer tensors are listed, not prunable"
        );
        assert!(m.tensors.iter().all(|e| e.name != "epoch"));
    }
}

#[test]
fn npz_opens_with_f64_analysed_as_f32() {
    let m = Model::open(&fixture("tiny.npz")).unwrap();
    let (t, e) = tensor(&m, "dense.weight");
    assert_eq!(e.shape, vec![3, 5]);
    assert!(close(
        &m.to_f32_vec(t),
        &(0..15).map(|i| i as f32 * 0.2 - 1.4).collect::<Vec<_>>()
    ));
    let (t, e) = tensor(&m, "emb");
    assert!(e.analysable() && e.default_prunable());
    assert_eq!(
        m.to_f32_vec(t),
        (0..8).map(|i| i as f32).collect::<Vec<_>>()
    );
    let (_, bias) = tensor(&m, "dense.bias");
    assert!(
        !bias.default_prunable(),
        "1-D tensors are not prunable by default"
    );
}

#[test]
fn mixed_dtypes_decode_and_empty_tensors_do_not_break_pruning() {
    let m = Model::open(&fixture("mixed_dtypes.safetensors")).unwrap();
    for (name, dtype) in [
        ("h.weight", "F16"),
        ("b.weight", "BF16"),
        ("d.weight", "F64"),
        ("i.index", "I64"),
    ] {
        assert_eq!(tensor(&m, name).1.dtype.to_string(), dtype);
    }
    assert!(!tensor(&m, "i.index").1.analysable());
    assert_eq!(tensor(&m, "empty.weight").1.numel, 0);
    let s = PruneSettings {
        sparsity: 0.5,
        ..Default::default()
    };
    let p = prune(&m, &s, &ScoreInputs::default(), &Progress::none()).unwrap();
    // h 6 + b 4 + d 4 (+ empty 0) prunable weights; half of 14.
    assert_eq!((p.alloc.prunable, p.alloc.pruned), (14, 7));

    // Export keeps names, shapes and dtypes; pruned positions read back as zero.
    let out = tmp("mixed.pruned.safetensors");
    export_pruned(&m, &p.masks, &out, &Progress::none()).unwrap();
    let back = Model::open(&out).unwrap();
    assert_eq!(back.tensors.len(), m.tensors.len());
    for (a, b) in m.tensors.iter().zip(&back.tensors) {
        assert_eq!((&a.name, &a.shape, &a.dtype), (&b.name, &b.shape, &b.dtype));
    }
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .expect("the safetensors crate reads our export");
    assert_eq!(
        st.tensor("i.index").unwrap().data(),
        m.tensor_bytes(tensor(&m, "i.index").0)
    );
    for (name, mask) in p.masks.iter() {
        let (t, _) = tensor(&m, name);
        let orig = m.to_f32_vec(t);
        let got = back.to_f32_vec(t);
        for i in 0..orig.len() {
            if mask.kept(i) {
                assert_eq!(
                    got[i].to_bits(),
                    orig[i].to_bits(),
                    "{name}[{i}] kept unchanged"
                );
            } else {
                assert_eq!(got[i], 0.0, "{name}[{i}] pruned");
            }
        }
    }
    let masks = tmp("mixed.masks.safetensors");
    export_masks(&m, &p.masks, &masks).unwrap();
    let mb = std::fs::read(&masks).unwrap();
    let ms = safetensors::SafeTensors::deserialize(&mb).unwrap();
    let hm = ms.tensor("h.weight").unwrap();
    assert_eq!(hm.dtype(), safetensors::Dtype::U8);
    assert_eq!(hm.shape(), &[2, 3]);
}

#[test]
fn nan_prunes_first_and_inf_is_kept_last() {
    let m = Model::open(&fixture("nan_inf.safetensors")).unwrap();
    // a.weight = [1, NaN, -3, +Inf, 0.5, -Inf, 2, NaN]
    let kept = |sparsity: f64| -> Vec<bool> {
        let s = PruneSettings {
            sparsity,
            ..Default::default()
        };
        let p = prune(&m, &s, &ScoreInputs::default(), &Progress::none()).unwrap();
        let mask = p.masks.get("a.weight").unwrap();
        (0..8).map(|i| mask.kept(i)).collect()
    };
    assert_eq!(
        kept(0.25),
        [true, false, true, true, true, true, true, false]
    );
    assert_eq!(
        kept(0.75),
        [false, false, false, true, false, true, false, false]
    );
    let h = prunescope::analysis::histogram(&m, m.find("a.weight").unwrap(), 16);
    assert_eq!((h.nan, h.pos_inf, h.neg_inf), (2, 1, 1));
}

#[test]
fn every_bad_file_gives_an_error_naming_the_file() {
    let cases = [
        "truncated.safetensors",
        "lying_offsets.safetensors",
        "bad_shape.safetensors",
        "huge_header.safetensors",
        "not_a_model.safetensors",
        "garbage.pt",
        "truncated.pt",
        "garbage.npz",
    ];
    for f in cases {
        let err = Model::open(&fixture(f))
            .err()
            .unwrap_or_else(|| panic!("{f} opened"));
        let msg = err.to_string();
        assert!(msg.contains(f), "{f}: {msg}");
        assert!(!msg.contains('\n'), "{f}: one line: {msg}");
    }
    let missing = Model::open(Path::new("/nonexistent/model.safetensors"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        missing.contains("/nonexistent/model.safetensors"),
        "{missing}"
    );
    let unknown = Model::open(&fixture("README.md"))
        .err()
        .unwrap()
        .to_string();
    assert!(unknown.contains("unsupported"), "{unknown}");
}

fn cli(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_prunescope"))
        .args(args)
        .output()
        .expect("running prunescope")
}

#[test]
fn cli_errors_exit_nonzero_with_one_line_and_no_panic() {
    let bad = fixture("lying_offsets.safetensors");
    let out_path = tmp("never.safetensors");
    for args in [
        vec!["inspect", bad.to_str().unwrap()],
        vec![
            "prune",
            bad.to_str().unwrap(),
            "--sparsity",
            "0.5",
            "--out",
            out_path.to_str().unwrap(),
        ],
    ] {
        let o = cli(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?}");
        assert!(err.contains("lying_offsets.safetensors"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    assert!(!out_path.exists(), "nothing written on failure");
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("sample_models/digits_mlp.safetensors");
    let o = cli(&[
        "prune",
        sample.to_str().unwrap(),
        "--pattern",
        "5:4",
        "--out",
        out_path.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("5:4"));
    let o = cli(&[
        "prune",
        sample.to_str().unwrap(),
        "--sparsity",
        "1.5",
        "--out",
        out_path.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
}

#[test]
fn cli_recipe_replay_is_byte_identical_and_counts_are_exact() {
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("sample_models/digits_mlp.safetensors");
    let (a, b, r, m) = (
        tmp("a.safetensors"),
        tmp("b.safetensors"),
        tmp("r.json"),
        tmp("m.safetensors"),
    );
    let o = cli(&[
        "prune",
        sample.to_str().unwrap(),
        "--sparsity",
        "0.63",
        "--min-keep",
        "0.1",
        "--criterion",
        "random",
        "--seed",
        "7",
        "--out",
        a.to_str().unwrap(),
        "--masks",
        m.to_str().unwrap(),
        "--save-recipe",
        r.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = cli(&[
        "prune",
        sample.to_str().unwrap(),
        "--recipe",
        r.to_str().unwrap(),
        "--out",
        b.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());

    // Exactly round(0.63 · N) prunable weights are zero in the output (the sample has no zeros).
    let out = Model::open(&a).unwrap();
    let (mut n, mut zeros) = (0usize, 0usize);
    for (t, e) in out.tensors.iter().enumerate() {
        if e.default_prunable() {
            n += e.numel;
            zeros += out.to_f32_vec(t).iter().filter(|v| **v == 0.0).count();
        }
    }
    assert_eq!(zeros, (0.63 * n as f64).round() as usize);

    // A recipe for another file is refused unless asked.
    let npz = fixture("tiny.npz");
    let o = cli(&[
        "prune",
        npz.to_str().unwrap(),
        "--recipe",
        r.to_str().unwrap(),
        "--out",
        b.to_str().unwrap(),
    ]);
    assert!(!o.status.success());

    // A bare path means "open it in the app"; a typo'd subcommand must not be taken for one.
    let o = cli(&["inspekt", sample.to_str().unwrap()]);
    assert!(!o.status.success());

    let o = cli(&["inspect", sample.to_str().unwrap(), "--json"]);
    assert!(o.status.success());
    let v: serde_json::Value =
        serde_json::from_slice(&o.stdout).expect("inspect --json prints JSON");
    assert!(v.to_string().contains("fc1.weight"));
}
