//! Sharded checkpoints: the fixture in `tests/fixtures/sharded` was written by the `safetensors`
//! Python package (`tools/make_sharded_fixture.py`), with the values it recorded beside it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use prunescope::model::Model;
use prunescope::progress::Progress;
use prunescope::prune::{PruneSettings, ScoreInputs, prune};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sharded")
}

const INDEX: &str = "model.safetensors.index.json";
const SHARDS: [&str; 3] = [
    "model-00001-of-00003.safetensors",
    "model-00002-of-00003.safetensors",
    "model-00003-of-00003.safetensors",
];

/// A copy of the fixture in a fresh folder, to break.
fn copy(tag: &str) -> PathBuf {
    let d = common::tempdir(tag);
    for f in SHARDS.iter().chain([&INDEX]) {
        std::fs::copy(fixture().join(f), d.join(f)).unwrap();
    }
    d
}

#[test]
fn a_checkpoint_opens_from_its_index_its_folder_or_any_shard_with_the_recorded_values() {
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture().join("../sharded_expected.json")).unwrap(),
    )
    .unwrap();
    let expected = expected.as_object().unwrap();
    for path in [fixture().join(INDEX), fixture(), fixture().join(SHARDS[1])] {
        let m = Model::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(m.tensors.len(), expected.len(), "{}", path.display());
        assert_eq!(m.shards.len(), 3);
        for (name, want) in expected {
            let t = m.find(name).unwrap();
            let e = &m.tensors[t];
            assert_eq!(
                e.dtype.safetensors_name().to_lowercase(),
                want["dtype"]
                    .as_str()
                    .unwrap()
                    .replace("bfloat16", "bf16")
                    .replace("float32", "f32")
            );
            let shape: Vec<usize> = want["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(e.shape, shape, "{name}");
            let sum: f64 = m.to_f32_vec(t).iter().map(|v| *v as f64).sum();
            assert!(
                (sum - want["sum"].as_f64().unwrap()).abs() < 1e-3,
                "{name}: {sum}"
            );
            let shard = &m
                .shards
                .iter()
                .find(|s| s.tensors.contains(name))
                .unwrap()
                .file;
            assert!(shard.ends_with(want["shard"].as_str().unwrap()));
        }
        assert_eq!(
            m.shards[0].metadata.get("format").map(String::as_str),
            Some("pt")
        );
    }
}

#[test]
fn broken_checkpoints_say_which_shard_and_which_tensor() {
    let err = |d: &Path| Model::open(&d.join(INDEX)).unwrap_err().to_string();
    // A shard gone.
    let d = copy("shard-missing");
    std::fs::remove_file(d.join(SHARDS[1])).unwrap();
    let e = err(&d);
    assert!(
        e.contains(SHARDS[1]) && e.contains("missing") && e.contains("layers.0.mlp"),
        "{e}"
    );
    // A shard cut short.
    let d = copy("shard-short");
    let bytes = std::fs::read(d.join(SHARDS[2])).unwrap();
    std::fs::write(d.join(SHARDS[2]), &bytes[..bytes.len() - 100]).unwrap();
    let e = err(&d);
    assert!(e.contains(SHARDS[2]), "{e}");
    // An index naming a tensor no shard holds.
    let d = copy("index-extra");
    let text = std::fs::read_to_string(d.join(INDEX)).unwrap().replace(
        "\"head.bias\"",
        "\"ghost.weight\": \"model-00003-of-00003.safetensors\", \"head.bias\"",
    );
    std::fs::write(d.join(INDEX), text).unwrap();
    let e = err(&d);
    assert!(e.contains("ghost.weight") && e.contains(SHARDS[2]), "{e}");
    // An index that puts a tensor in the wrong shard.
    let d = copy("index-lies");
    let text = std::fs::read_to_string(d.join(INDEX)).unwrap().replace(
        "\"head.weight\": \"model-00003-of-00003.safetensors\"",
        "\"head.weight\": \"model-00001-of-00003.safetensors\"",
    );
    std::fs::write(d.join(INDEX), text).unwrap();
    let e = err(&d);
    assert!(
        e.contains("head.weight") && e.contains(SHARDS[0]) && e.contains(SHARDS[2]),
        "{e}"
    );
    // A shard path that leaves the folder.
    let d = copy("index-escape");
    let text = std::fs::read_to_string(d.join(INDEX)).unwrap().replace(
        "\"model-00003-of-00003.safetensors\"",
        "\"../x.safetensors\"",
    );
    std::fs::write(d.join(INDEX), text).unwrap();
    assert!(err(&d).contains("not a plain file name"));
    // A folder of shards without an index.
    let d = copy("no-index");
    std::fs::remove_file(d.join(INDEX)).unwrap();
    let e = Model::open(&d).unwrap_err().to_string();
    assert!(e.contains("index"), "{e}");
}

#[test]
fn pruning_exports_the_same_shards_and_index_with_zeros_where_pruned() {
    let m = Model::open(&fixture()).unwrap();
    let settings = PruneSettings {
        sparsity: 0.5,
        ..Default::default()
    };
    let p = prune(&m, &settings, &ScoreInputs::default(), &Progress::none()).unwrap();
    let out = common::tempdir("sharded-out").join("pruned");
    prunescope::export::export_weights(&m, &p.masks, &out, &Progress::none()).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut want: Vec<String> = SHARDS
        .iter()
        .chain([&INDEX])
        .map(|s| s.to_string())
        .collect();
    want.sort();
    assert_eq!(names, want, "no temporary files left, nothing else written");
    assert_eq!(
        std::fs::read(out.join(INDEX)).unwrap(),
        std::fs::read(fixture().join(INDEX)).unwrap()
    );
    // Read back shard by shard with the safetensors crate: every tensor where it was, masked
    // ones zero exactly where pruned, the others byte-identical.
    for shard in SHARDS {
        let a = std::fs::read(fixture().join(shard)).unwrap();
        let b = std::fs::read(out.join(shard)).unwrap();
        let (a, b) = (
            safetensors::SafeTensors::deserialize(&a).unwrap(),
            safetensors::SafeTensors::deserialize(&b).unwrap(),
        );
        let mut an = a.names();
        an.sort();
        let mut bn = b.names();
        bn.sort();
        assert_eq!(an, bn);
        for name in an {
            let (x, y) = (a.tensor(name).unwrap(), b.tensor(name).unwrap());
            assert_eq!((x.dtype(), x.shape()), (y.dtype(), y.shape()));
            match p.masks.get(name) {
                None => assert_eq!(x.data(), y.data(), "{name}"),
                Some(mask) => {
                    let size = x.data().len() / mask.len();
                    for i in 0..mask.len() {
                        let (xe, ye) =
                            (&x.data()[i * size..][..size], &y.data()[i * size..][..size]);
                        if mask.kept(i) {
                            assert_eq!(xe, ye, "{name}[{i}]");
                        } else {
                            assert!(ye.iter().all(|b| *b == 0), "{name}[{i}]");
                        }
                    }
                }
            }
        }
    }
    // The reopened export prunes to exactly the same count.
    let again = Model::open(&out).unwrap();
    assert_eq!(again.shards.len(), 3);
    // And the Python package reads it back, where it is installed.
    let python =
        std::env::var("PRUNESCOPE_PYTHON").unwrap_or_else(|_| "/work/pyenv/bin/python".into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/check_sharded_export.py");
    match Command::new(&python)
        .arg(&script)
        .arg(fixture())
        .arg(&out)
        .output()
    {
        Ok(o) if o.status.success() => {
            let line = String::from_utf8_lossy(&o.stdout);
            assert!(line.contains("\"ok\": true"), "{line}");
            eprintln!("safetensors (Python) read the export back: {line}");
        }
        Ok(o) if String::from_utf8_lossy(&o.stderr).contains("No module named") => {
            eprintln!(
                "SKIPPED: {python} has no safetensors package; the Python read-back was not run"
            )
        }
        Ok(o) => panic!("{}", String::from_utf8_lossy(&o.stderr)),
        Err(e) => {
            eprintln!("SKIPPED: no Python at {python} ({e}); the Python read-back was not run")
        }
    }
}

#[test]
fn a_failed_export_leaves_no_shard_behind_and_never_touches_the_input() {
    let m = Model::open(&fixture()).unwrap();
    let masks = prunescope::prune::MaskSet::new();
    // The third shard's name is taken by a folder: writing it fails after two shards.
    let out = common::tempdir("sharded-fail");
    std::fs::create_dir_all(out.join(SHARDS[2]).join("x")).unwrap();
    let e = prunescope::export::export_weights(&m, &masks, &out, &Progress::none()).unwrap_err();
    assert!(e.to_string().contains(SHARDS[2]), "{e}");
    for s in &SHARDS[..2] {
        assert!(!out.join(s).exists(), "{s} was left behind");
    }
    assert!(!out.join(INDEX).exists());
    // Exporting over the checkpoint's own folder is refused before anything is written.
    let d = copy("sharded-self");
    let m = Model::open(&d).unwrap();
    let before = std::fs::read(d.join(SHARDS[0])).unwrap();
    let e = prunescope::export::export_weights(&m, &masks, &d, &Progress::none()).unwrap_err();
    assert!(e.to_string().contains("replace"), "{e}");
    assert_eq!(std::fs::read(d.join(SHARDS[0])).unwrap(), before);
}

#[test]
fn the_cli_prunes_a_checkpoint_folder_into_shards() {
    let out = common::tempdir("sharded-cli").join("out");
    let o = Command::new(env!("CARGO_BIN_EXE_prunescope"))
        .args(["prune"])
        .arg(fixture())
        .args(["--sparsity", "0.3", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for s in SHARDS.iter().chain([&INDEX]) {
        assert!(out.join(s).is_file(), "{s}");
    }
    let o = Command::new(env!("CARGO_BIN_EXE_prunescope"))
        .args(["inspect", "--json"])
        .arg(fixture().join(SHARDS[0]))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        j.to_string().contains("head.weight"),
        "a shard opens the whole checkpoint"
    );
}
