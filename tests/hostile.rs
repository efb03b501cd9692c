//! Nothing a file or a command line does can crash prunescope, hang it, or destroy data.
//!
//! - Files written by the real libraries (torch.save, numpy.savez[_compressed]) load with the
//!   values the libraries themselves recorded (tests/fixtures/real/*.json), every dtype and
//!   layout included, and every tensor is written back.
//! - Every file of the hostile corpus (tests/fixtures/hostile, made by
//!   tools/make_hostile_fixtures.py, plus the older corrupt fixtures) gives a one-line error
//!   naming the file, in the library, in the CLI and in the worker (which keeps its model).
//! - Outputs never replace inputs, however the path is spelled; writes are atomic even when
//!   the process is killed, the disk is full or the directory is read-only.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use prunescope::model::{Model, ModelFormat};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Runs the CLI with a hang guard: a run past `limit` is killed and fails the test. Output is
/// drained on threads so that a large one cannot block the child on a full pipe.
fn cli_in(dir: Option<&Path>, args: &[&str], limit: Duration) -> Output {
    common::isolate();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_prunescope"));
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    let mut child = cmd.spawn().unwrap();
    let drain = |r: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(child.stdout.take().map(|r| Box::new(r) as _));
    let err = drain(child.stderr.take().map(|r| Box::new(r) as _));
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("prunescope {args:?} ran past {limit:?}: a hang");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

fn cli(args: &[&str]) -> Output {
    cli_in(None, args, Duration::from_secs(120))
}

/// `prunescope prune MODEL --sparsity 0.5 --out OUT`.
fn prune_half(model: &Path, out: &Path) -> Output {
    cli(&[
        "prune",
        model.to_str().unwrap(),
        "--sparsity",
        "0.5",
        "--out",
        out.to_str().unwrap(),
    ])
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A failed CLI run: exit status 1 and exactly one line, "error: …", with no panic text.
fn one_line_error(o: &Output) -> String {
    let e = stderr(o);
    assert_eq!(o.status.code(), Some(1), "exit status; stderr: {e}");
    assert_eq!(e.lines().count(), 1, "one line, got: {e:?}");
    assert!(e.starts_with("error: "), "{e}");
    assert!(
        !e.contains("panicked") && !e.contains("internal error") && !e.contains("backtrace"),
        "{e}"
    );
    e
}

// ---------------------------------------------------------------------------------------------
// Files from the real libraries
// ---------------------------------------------------------------------------------------------

fn expected(json: &str) -> BTreeMap<String, serde_json::Value> {
    let text = std::fs::read_to_string(fixtures().join("real").join(json)).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn our_dtype(lib: &str) -> &'static str {
    match lib {
        "float32" => "F32",
        "float16" => "F16",
        "bfloat16" => "BF16",
        "float64" => "F64",
        "int8" => "I8",
        "int16" => "I16",
        "int32" => "I32",
        "int64" => "I64",
        "uint8" => "U8",
        "bool" => "BOOL",
        other => panic!("no mapping for {other}"),
    }
}

/// Integer values decoded from raw little-endian bytes: independent of our f32 decoding.
fn ints(bytes: &[u8], dtype: &str) -> Vec<i64> {
    match dtype {
        "I8" => bytes.iter().map(|&b| b as i8 as i64).collect(),
        "U8" | "BOOL" => bytes.iter().map(|&b| b as i64).collect(),
        "I16" => bytes
            .chunks_exact(2)
            .map(|c| i16::from_le_bytes([c[0], c[1]]) as i64)
            .collect(),
        "I32" => bytes
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
            .collect(),
        "I64" => bytes
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        d => panic!("{d} is not an integer dtype"),
    }
}

/// Every tensor the library recorded is there, with its shape, dtype and values; nothing else.
fn matches_library(m: &Model, json: &str) {
    let want = expected(json);
    assert_eq!(
        m.tensors.len(),
        want.len(),
        "{json}: tensor count; got {:?}",
        m.tensors.iter().map(|t| &t.name).collect::<Vec<_>>()
    );
    for (name, w) in &want {
        let t = m
            .find(name)
            .unwrap_or_else(|| panic!("{json}: {name} missing"));
        let e = &m.tensors[t];
        let shape: Vec<usize> = serde_json::from_value(w["shape"].clone()).unwrap();
        assert_eq!(e.shape, shape, "{json}: {name} shape");
        let dtype = our_dtype(w["dtype"].as_str().unwrap());
        assert_eq!(e.dtype.to_string(), dtype, "{json}: {name} dtype");
        let values = w["values"].as_array().unwrap();
        if e.dtype.is_float() {
            let got = if e.numel == 0 {
                vec![]
            } else {
                m.to_f32_vec(t)
            };
            let want: Vec<f32> = values.iter().map(|v| v.as_f64().unwrap() as f32).collect();
            assert_eq!(got, want, "{json}: {name} values");
        } else {
            let want: Vec<i64> = values.iter().map(|v| v.as_i64().unwrap()).collect();
            assert_eq!(
                ints(m.tensor_bytes(t), dtype),
                want,
                "{json}: {name} values"
            );
        }
    }
}

#[test]
fn torch_save_checkpoints_load_every_dtype_and_view_as_torch_recorded() {
    for f in [
        "torch_dtypes.pt",
        "torch_checkpoint.pt",
        "torch_protocol4.pt",
    ] {
        let m = Model::open(&fixtures().join("real").join(f)).unwrap_or_else(|e| panic!("{e}"));
        matches_library(&m, "torch_dtypes.json");
    }
}

#[test]
fn torch_save_files_open_whatever_the_length_of_their_stem() {
    // torch.save names the archive's inner folder after the file's stem; the zip reader candle
    // used refused exactly 21 characters (its first central-directory record is then 76 bytes,
    // the size of the ZIP64 end record and locator torch always writes, and the reader took
    // that for a 76-byte prefix). Every length from 1 to 40, from real torch.save files:
    for n in 1..=40 {
        let p = fixtures()
            .join("real/names")
            .join(format!("{}.pt", "n".repeat(n)));
        let m = Model::open(&p).unwrap_or_else(|e| panic!("stem length {n}: {e}"));
        let w = m.find("w").unwrap();
        assert_eq!(
            m.to_f32_vec(w),
            vec![1.0, -2.0, 3.0, -4.0],
            "stem length {n}"
        );
        assert_eq!(ints(m.tensor_bytes(m.find("n").unwrap()), "I32"), vec![5]);
    }
}

#[test]
fn numpy_archives_load_compressed_fortran_and_big_endian_as_numpy_recorded() {
    let m = Model::open(&fixtures().join("real/np_compressed.npz")).unwrap();
    matches_library(&m, "np_compressed.json");
    let m = Model::open(&fixtures().join("real/np_layouts.npz")).unwrap();
    matches_library(&m, "np_layouts.json");
    // A member that inflates past one output buffer (a bug the small members hid).
    let m = Model::open(&fixtures().join("real/np_compressed_large.npz")).unwrap();
    matches_library(&m, "np_compressed_large.json");
}

#[test]
fn every_tensor_is_written_back_and_unpruned_ones_unchanged() {
    let dir = common::tempdir("hostile-writeback");
    let src = fixtures().join("real/torch_dtypes.pt");
    let out = dir.join("out.safetensors");
    let o = prune_half(&src, &out);
    assert!(o.status.success(), "{}", stderr(&o));
    let input = Model::open(&src).unwrap();
    let bytes = std::fs::read(&out).unwrap();
    // Read back with the reference safetensors reader, not ours.
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.len(), input.tensors.len(), "no tensor dropped");
    for (t, e) in input.tensors.iter().enumerate() {
        let view = st.tensor(&e.name).unwrap();
        assert_eq!(view.shape(), e.shape.as_slice(), "{}", e.name);
        if !e.default_prunable() {
            assert_eq!(view.data(), input.tensor_bytes(t), "{} unchanged", e.name);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// The hostile corpus
// ---------------------------------------------------------------------------------------------

/// Each hostile file and a phrase its error must contain.
const HOSTILE: &[(&str, &str)] = &[
    ("hostile/pt_huge_shape.pt", "reaches past its storage"),
    ("hostile/npz_huge_shape.npz", "needs 4503599627370496 bytes"),
    (
        "hostile/npz_shape_wrap_a.npz",
        "more elements than can be addressed",
    ),
    (
        "hostile/npz_shape_wrap_b.npz",
        "more elements than can be addressed",
    ),
    (
        "hostile/npz_header_lies.npz",
        "needs 400 bytes but the array has 16",
    ),
    ("hostile/npz_object_array.npz", "dtype '|O'"),
    ("hostile/pt_deep_nesting.pt", "no tensors found"),
    ("hostile/pt_deep_marks.pt", "no tensors found"),
    ("hostile/pt_bad_opcode.pt", "unsupported pickle opcode 0xff"),
    ("hostile/pt_stack_underflow.pt", "no MARK"),
    ("hostile/pt_memo_missing.pt", "memo key 7 was never stored"),
    ("hostile/pt_truncated_pickle.pt", "truncated"),
    ("hostile/pt_storage_missing.pt", "data/7' is missing"),
    (
        "hostile/pt_view_past_storage.pt",
        "reaches past its storage",
    ),
    (
        "hostile/pt_negative_stride.pt",
        "stride is not a non-negative integer",
    ),
    ("hostile/pt_storage_key_path.pt", "is not a plain name"),
    (
        "hostile/pt_unknown_storage.pt",
        "QUInt4x2Storage is not supported",
    ),
    (
        "hostile/pt_view_copy_bomb.pt",
        "views of shared storage this large",
    ),
    ("hostile/pt_module_object.pt", "pickled __main__.Net object"),
    ("hostile/pt_quantized.pt", "_rebuild_qtensor tensors"),
    ("hostile/pt_legacy.pt", "legacy"),
    ("hostile/pt_zero_stride_huge.pt", "overflows"),
    ("hostile/pt_many_dims.pt", "100 dimensions"),
    ("hostile/pt_long_global.pt", "global name is too long"),
    ("hostile/npz_deflate_bomb.npz", "decompression bomb"),
    (
        "hostile/npz_inflates_past.npz",
        "inflates past the 100 bytes",
    ),
    (
        "hostile/npz_inflates_short.npz",
        "not the 10178 its header promises",
    ),
    ("hostile/npz_deflate_garbage.npz", "corrupt deflate data"),
    ("hostile/npz_method_bzip2.npz", "compression method 12"),
    ("hostile/npz_encrypted.npz", "encrypted"),
    ("hostile/npz_duplicate_member.npz", "appears twice"),
    ("hostile/npz_cd_outside.npz", "lies outside"),
    ("hostile/npz_count_lies.npz", "claims 60000 members"),
    ("hostile/npz_empty_archive.npz", "holds no arrays"),
    ("truncated.safetensors", "header length"),
    ("lying_offsets.safetensors", "lie outside"),
    ("bad_shape.safetensors", "needs 100 bytes"),
    ("huge_header.safetensors", "header length"),
    ("not_a_model.safetensors", "header length"),
    ("garbage.pt", "no zip signature"),
    ("truncated.pt", "not a zip archive"),
    ("garbage.npz", "bad magic"),
    ("onnx/bad_truncated.onnx", "runs past its message"),
    ("onnx/bad_garbage.onnx", "unsupported protobuf wire type"),
    (
        "onnx/bad_dims_lie.onnx",
        "needs 281474976710656 bytes but the data has 8192",
    ),
    ("onnx/bad_duplicate_initializer.onnx", "appears twice"),
    (
        "onnx/bad_external_missing.onnx",
        "cannot be opened: No such file or directory",
    ),
    (
        "onnx/bad_external_escapes.onnx",
        "leaves the model's folder",
    ),
    ("onnx/bad_external_short.onnx", "lies past the end"),
];

#[test]
fn the_corpus_lists_every_hostile_file() {
    let listed: Vec<&str> = HOSTILE.iter().map(|(f, _)| *f).collect();
    for e in std::fs::read_dir(fixtures().join("hostile")).unwrap() {
        let name = format!("hostile/{}", e.unwrap().file_name().to_string_lossy());
        let loads = ["hostile/pt_memo_bomb.pt", "hostile/pt_control_chars.pt"];
        assert!(
            listed.contains(&name.as_str()) || loads.contains(&name.as_str()),
            "{name} has no expectation in HOSTILE"
        );
    }
}

#[test]
fn every_hostile_file_is_a_clear_error_in_the_library() {
    for (f, phrase) in HOSTILE {
        let p = fixtures().join(f);
        let e = Model::open(&p).map(|_| ()).expect_err(f).to_string();
        let file = Path::new(f).file_name().unwrap().to_string_lossy();
        assert!(e.contains(&*file), "{f}: the error names the file: {e}");
        assert!(e.contains(phrase), "{f}: expected '{phrase}' in: {e}");
        // The in-memory reader that the fuzz targets drive agrees.
        let format = match p.extension().unwrap().to_str().unwrap() {
            "pt" => ModelFormat::PyTorch,
            "npz" => ModelFormat::Npz,
            "onnx" => ModelFormat::Onnx,
            _ => ModelFormat::Safetensors,
        };
        let bytes = std::fs::read(&p).unwrap();
        assert!(Model::from_bytes("corpus", format, bytes).is_err(), "{f}");
    }
}

#[test]
fn every_hostile_file_is_one_line_from_the_cli_inspect_and_prune() {
    let dir = common::tempdir("hostile-cli");
    let out = dir.join("out.safetensors");
    for (f, phrase) in HOSTILE {
        let p = fixtures().join(f);
        for (what, o) in [
            ("inspect", cli(&["inspect", p.to_str().unwrap()])),
            ("prune", prune_half(&p, &out)),
        ] {
            let e = one_line_error(&o);
            assert!(e.contains(phrase), "{f} {what}: {e}");
        }
    }
    assert!(!out.exists(), "no output from a failed load");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn memo_bomb_loads_its_tensor_without_expanding_the_bomb() {
    // 39 levels of ten references each: 10^39 strings if a reader copied memo entries.
    let m = Model::open(&fixtures().join("hostile/pt_memo_bomb.pt")).unwrap();
    assert_eq!(m.tensors.len(), 1);
    assert_eq!(
        m.to_f32_vec(m.find("fc.weight").unwrap()),
        vec![1.0, -2.0, 3.0, -4.0]
    );
}

#[test]
fn names_cannot_drive_the_terminal() {
    let p = fixtures().join("hostile/pt_control_chars.pt");
    let o = cli(&["inspect", p.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(!out.contains('\u{1b}') && !out.contains('\r'), "{out:?}");
    assert!(
        !out.lines().any(|l| l.starts_with("error: forged")),
        "a name forged a line: {out}"
    );
    assert!(out.contains(r"evil\u{1b}[2J"), "{out}");
    // JSON output escapes them by construction and still round-trips the name.
    let o = cli(&["inspect", p.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        v["tensors"][0]["name"],
        "evil\u{1b}[2J\u{1b}[31m\nerror: forged line\r"
    );
    // In an error message too.
    let dir = common::tempdir("hostile-ctl");
    let bad = dir.join("evil\u{1b}[2J.safetensors");
    std::fs::write(&bad, b"garbage").unwrap();
    let o = cli(&["inspect", bad.to_str().unwrap()]);
    let e = one_line_error(&o);
    assert!(!e.contains('\u{1b}') && e.contains(r"\u{1b}"), "{e:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_tensor_name_longer_than_a_format_width_is_printed_not_a_panic() {
    let dir = common::tempdir("hostile-longname");
    let name = "x".repeat(70_000);
    let p = dir.join("long.safetensors");
    prunescope::export::write_f32_safetensors(
        &p,
        &Default::default(),
        &[(name.clone(), vec![2, 2], vec![1.0, 2.0, 3.0, 4.0])],
    )
    .unwrap();
    let o = cli(&["inspect", p.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains(&name));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn fifos_directories_and_missing_files_are_refused_at_once() {
    let dir = common::tempdir("hostile-special");
    let fifo = dir.join("pipe.safetensors");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let e = Model::open(&fifo).unwrap_err().to_string();
    assert!(e.contains("not a regular file"), "{e}");
    let o = cli_in(
        None,
        &["inspect", fifo.to_str().unwrap()],
        Duration::from_secs(30),
    );
    assert!(one_line_error(&o).contains("not a regular file"));
    // A recipe that is a FIFO does not block either.
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("sample_models/digits_mlp.safetensors");
    let o = cli_in(
        None,
        &[
            "prune",
            sample.to_str().unwrap(),
            "--recipe",
            fifo.to_str().unwrap(),
            "--out",
            dir.join("o.safetensors").to_str().unwrap(),
        ],
        Duration::from_secs(30),
    );
    assert!(one_line_error(&o).contains("not a regular file"));

    let d = dir.join("folder.safetensors");
    std::fs::create_dir(&d).unwrap();
    let e = Model::open(&d).unwrap_err().to_string();
    assert!(e.contains("is a directory"), "{e}");

    let o = cli(&["inspect", dir.join("missing.pt").to_str().unwrap()]);
    let e = one_line_error(&o);
    assert_eq!(e.matches("No such file or directory").count(), 1, "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn many_tiny_tensors_inspect_and_prune_without_quadratic_lookups() {
    // 10^5 tensors in a 9 MB file took over 60 s when every lookup scanned the list; the
    // release-build figures for 10^6 are in the issue's closing note. This guards the
    // behaviour (and a hang) with a generous limit, not a speed target.
    let dir = common::tempdir("hostile-many");
    let p = dir.join("many.safetensors");
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = (0..100_000)
        .map(|i| {
            let f = i as f32;
            (
                format!("layer.{i}.weight"),
                vec![2, 2],
                vec![f, -f, 0.5, 1.0],
            )
        })
        .collect();
    prunescope::export::write_f32_safetensors(&p, &Default::default(), &tensors).unwrap();
    let limit = Duration::from_secs(300);
    let o = cli_in(None, &["inspect", p.to_str().unwrap(), "--json"], limit);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.join("out.safetensors");
    let o = cli_in(
        None,
        &[
            "prune",
            p.to_str().unwrap(),
            "--sparsity",
            "0.5",
            "--out",
            out.to_str().unwrap(),
            "--masks",
            dir.join("m.safetensors").to_str().unwrap(),
        ],
        limit,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let m = Model::open(&out).unwrap();
    assert_eq!(m.tensors.len(), 100_000);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// Outputs never destroy inputs
// ---------------------------------------------------------------------------------------------

#[test]
fn an_output_that_names_an_input_is_refused_however_spelled() {
    let dir = common::tempdir("hostile-clobber");
    let model = dir.join("x.pt");
    std::fs::copy(fixtures().join("real/torch_dtypes.pt"), &model).unwrap();
    let original = std::fs::read(&model).unwrap();
    std::os::unix::fs::symlink(&model, dir.join("link.pt")).unwrap();
    std::fs::hard_link(&model, dir.join("hard.pt")).unwrap();
    std::fs::create_dir(dir.join("sub")).unwrap();
    let prune = |extra: &[&str]| {
        let mut args = vec!["prune", "x.pt", "--sparsity", "0.5"];
        args.extend_from_slice(extra);
        cli_in(Some(&dir), &args, Duration::from_secs(60))
    };
    for extra in [
        &["--out", "x.pt"][..],
        &["--out", "./x.pt"],
        &["--out", "sub/../x.pt"],
        &["--out", "link.pt"],
        &["--out", "hard.pt"],
        &["--out", dir.join("x.pt").to_str().unwrap()],
        &["--out", "o.safetensors", "--masks", "x.pt"],
        &["--out", "o.safetensors", "--save-recipe", "./x.pt"],
    ] {
        let o = prune(extra);
        let e = one_line_error(&o);
        assert!(e.contains("would destroy the input"), "{extra:?}: {e}");
        assert_eq!(std::fs::read(&model).unwrap(), original, "{extra:?}");
    }
    // Two outputs on one file.
    let o = prune(&["--out", "o.safetensors", "--masks", "./o.safetensors"]);
    assert!(one_line_error(&o).contains("are the same file"));
    assert!(!dir.join("o.safetensors").exists());
    // A recipe being replayed is an input too.
    std::fs::write(dir.join("r.json"), "{}").unwrap();
    let o = cli_in(
        Some(&dir),
        &[
            "prune",
            "x.pt",
            "--recipe",
            "r.json",
            "--out",
            "o.safetensors",
            "--save-recipe",
            "r.json",
        ],
        Duration::from_secs(60),
    );
    assert!(one_line_error(&o).contains("would destroy the input"));
    assert_eq!(std::fs::read_to_string(dir.join("r.json")).unwrap(), "{}");
    // And the ordinary case still works.
    let o = prune(&["--out", "o.safetensors", "--masks", "m.safetensors"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Opens `path` in the worker and waits for the job's end: the opened model's id, or the error.
fn worker_open(w: &mut prunescope::worker::WorkerHandle, path: PathBuf) -> Result<u64, String> {
    use prunescope::worker::{Event, OpenSource};
    w.open(OpenSource::Path(path)).unwrap();
    let mut id = None;
    loop {
        match w.events().recv_timeout(Duration::from_secs(60)).unwrap() {
            Event::ModelOpened(s) => id = Some(s.id),
            Event::JobFinished { .. } => return id.ok_or_else(|| "no model".to_string()),
            Event::JobFailed { error, .. } => return Err(error),
            _ => {}
        }
    }
}

#[test]
fn the_worker_refuses_an_export_over_the_open_model_and_keeps_it() {
    use prunescope::worker::{Event, ExportRequest, WorkerHandle};
    let dir = common::tempdir("hostile-worker-clobber");
    let model = dir.join("m.npz");
    std::fs::copy(fixtures().join("real/np_layouts.npz"), &model).unwrap();
    let original = std::fs::read(&model).unwrap();
    let mut w = WorkerHandle::spawn(|| {});
    let next = |w: &WorkerHandle| w.events().recv_timeout(Duration::from_secs(60)).unwrap();
    worker_open(&mut w, model.clone()).unwrap();
    let req = |weights: PathBuf, masks: Option<PathBuf>| ExportRequest {
        settings: prunescope::prune::PruneSettings {
            sparsity: 0.5,
            ..Default::default()
        },
        weights: Some(weights),
        masks,
        recipe: None,
        compacted: None,
    };
    for r in [
        req(dir.join("./m.npz"), None),
        req(dir.join("w.safetensors"), Some(model.clone())),
    ] {
        w.export(r).unwrap();
        let error = loop {
            match next(&w) {
                Event::JobFailed { error, .. } => break error,
                Event::JobFinished { message, .. } => panic!("export ran: {message}"),
                _ => {}
            }
        };
        assert!(error.contains("would destroy the input"), "{error}");
        assert_eq!(std::fs::read(&model).unwrap(), original);
    }
    assert!(!dir.join("w.safetensors").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_worker_reports_every_hostile_file_and_keeps_its_model() {
    use prunescope::worker::{Event, PreviewRequest, WorkerHandle};
    let mut w = WorkerHandle::spawn(|| {});
    let first = worker_open(&mut w, fixtures().join("real/torch_dtypes.pt")).unwrap();
    for (f, phrase) in HOSTILE {
        let e = worker_open(&mut w, fixtures().join(f)).unwrap_err();
        assert!(e.contains(phrase), "{f}: {e}");
    }
    // The first model is still the open one: a preview of it is answered.
    w.preview(PreviewRequest {
        generation: 1,
        model: first,
        settings: prunescope::prune::PruneSettings {
            sparsity: 0.5,
            ..Default::default()
        },
        selected: None,
        heatmap: None,
    })
    .unwrap();
    let preview = loop {
        match w.events().recv_timeout(Duration::from_secs(60)).unwrap() {
            Event::Preview(p) => break p,
            Event::PreviewError { error, .. } => panic!("{error}"),
            _ => {}
        }
    };
    assert_eq!(preview.model, first);
    // f32 4×5, f16 3×4, bf16 3×4, f64 2×3, transposed 8×6, sliced 3×3, tied 4×6 and 6×4,
    // param 3×3: the float tensors of two or more dimensions with any elements.
    assert_eq!(
        preview.alloc.prunable,
        20 + 12 + 12 + 6 + 48 + 9 + 24 + 24 + 9
    );
}

// ---------------------------------------------------------------------------------------------
// Writes are atomic
// ---------------------------------------------------------------------------------------------

/// A model big enough that its export takes a while even in a release build.
fn big_model(dir: &Path, numel: usize) -> PathBuf {
    let p = dir.join("big.safetensors");
    let values: Vec<f32> = (0..numel)
        .map(|i| ((i * 7919) % 1000) as f32 - 500.0)
        .collect();
    prunescope::export::write_f32_safetensors(
        &p,
        &Default::default(),
        &[("big.weight".to_string(), vec![numel / 1000, 1000], values)],
    )
    .unwrap();
    p
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Whether `pid` holds an unnamed (O_TMPFILE) file open in `dir`: the export has begun.
fn writing_unnamed_file(pid: u32, dir: &Path) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    let dir = std::fs::canonicalize(dir).unwrap();
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|t| {
            let t = t.to_string_lossy();
            t.starts_with(&*dir.to_string_lossy()) && t.ends_with("(deleted)")
        })
    })
}

#[test]
fn an_export_killed_midway_leaves_the_old_file_and_no_temporary() {
    let dir = common::tempdir("hostile-kill");
    let model = big_model(&dir, 40_000_000);
    let out = dir.join("out.safetensors");
    std::fs::write(&out, b"the previous export").unwrap();
    let before = listing(&dir);
    let mut child = Command::new(env!("CARGO_BIN_EXE_prunescope"))
        .args(["prune", model.to_str().unwrap(), "--sparsity", "0.5"])
        .args(["--out", out.to_str().unwrap()])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The export has begun once the process holds its temporary file: unnamed (O_TMPFILE)
    // where the file system has it, else a named `.out.safetensors.tmp-PID-N`.
    let named_temp = || {
        listing(&dir)
            .iter()
            .any(|n| n.starts_with(".out.safetensors.tmp-"))
    };
    let start = Instant::now();
    let unnamed = loop {
        if writing_unnamed_file(child.id(), &dir) {
            break true;
        }
        if named_temp() {
            break false;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the export finished before it could be interrupted"
        );
        assert!(
            start.elapsed() < Duration::from_secs(240),
            "export never started"
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    child.kill().unwrap(); // SIGKILL: no destructor, no cleanup code runs
    child.wait().unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), b"the previous export");
    if unnamed {
        assert_eq!(listing(&dir), before, "nothing left behind");
    } else {
        // Without O_TMPFILE a killed writer's named file stays until the next write to the
        // same target sweeps it.
        eprintln!("note: this file system has no O_TMPFILE; checking the sweep instead");
        prunescope::util::atomic_write(&out, |w| w.write_all(b"next")).unwrap();
        assert_eq!(listing(&dir), before, "the leftover was swept");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Mounts a small tmpfs at `dir` (root only); unmounts on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, opts: &str) -> Option<Tmpfs> {
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "tmpfs", dir.to_str().unwrap()])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_gives_an_error_and_leaves_nothing_half_written() {
    let dir = common::tempdir("hostile-full");
    let model = big_model(&dir, 1_000_000); // 4 MB of weights
    // A file-size limit makes every write past 1 MB fail, as a full disk does; it works for
    // any user. SIGXFSZ is ignored so that the write returns EFBIG instead of killing us.
    let out = dir.join("out.safetensors");
    std::fs::write(&out, b"old").unwrap();
    let before = listing(&dir);
    let bin = env!("CARGO_BIN_EXE_prunescope");
    let script = format!(
        "trap '' XFSZ; ulimit -f 1024; exec '{bin}' prune '{}' --sparsity 0.5 --out '{}'",
        model.display(),
        out.display()
    );
    let o = Command::new("sh").args(["-c", &script]).output().unwrap();
    let e = one_line_error(&o);
    assert!(e.contains("out.safetensors: cannot write"), "{e}");
    assert_eq!(std::fs::read(&out).unwrap(), b"old");
    assert_eq!(listing(&dir), before);

    // A real full file system, where this user may mount one.
    let small = dir.join("small");
    std::fs::create_dir(&small).unwrap();
    match Tmpfs::mount(&small, "size=1m") {
        Some(_fs) => {
            let out = small.join("out.safetensors");
            std::fs::write(&out, b"old").unwrap();
            let o = prune_half(&model, &out);
            let e = one_line_error(&o);
            assert!(e.contains("No space left on device"), "{e}");
            assert_eq!(std::fs::read(&out).unwrap(), b"old");
            assert_eq!(listing(&small), vec!["out.safetensors"]);
        }
        None => eprintln!("note: cannot mount a tmpfs here (not root); the ulimit case ran"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_read_only_directory_gives_an_error_and_writes_nothing() {
    let dir = common::tempdir("hostile-ro");
    let model = big_model(&dir, 10_000);
    let ro = dir.join("ro");
    std::fs::create_dir(&ro).unwrap();
    // Root ignores permission bits, so mount a read-only file system where we can.
    let mounted = Tmpfs::mount(&ro, "ro,size=1m");
    if mounted.is_none() {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
        if std::fs::write(ro.join("probe"), b"").is_ok() {
            eprintln!("note: neither a read-only mount nor permissions stop this user; skipped");
            let _ = std::fs::remove_file(ro.join("probe"));
            return;
        }
    }
    let o = prune_half(&model, &ro.join("out.safetensors"));
    let e = one_line_error(&o);
    assert!(
        e.contains("Read-only file system") || e.contains("Permission denied"),
        "{e}"
    );
    assert!(listing(&ro).is_empty());
    drop(mounted);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_named_temporary_fallback_cleans_up_after_killed_writers() {
    // Where O_TMPFILE is missing, temporaries are named; one left by a dead process is swept by
    // the next write to the same target. Simulate the leftover of a process that is gone.
    let dir = common::tempdir("hostile-sweep");
    let target = dir.join("w.json");
    let dead_pid = 999_999_999u32;
    let stale = dir.join(format!(".w.json.tmp-{dead_pid}-0"));
    std::fs::File::create(&stale)
        .unwrap()
        .write_all(b"partial")
        .unwrap();
    prunescope::util::atomic_write(&target, |w| w.write_all(b"{}")).unwrap();
    assert_eq!(listing(&dir), vec!["w.json"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn empty_big_endian_arrays_with_huge_dimensions_load_as_empty() {
    use prunescope::model::zip::write_stored_zip;
    let header =
        "{'descr': '>f4', 'fortran_order': False, 'shape': (0, 1099511627776, 1099511627776), }";
    let mut npy = b"\x93NUMPY\x01\x00".to_vec();
    npy.extend_from_slice(&(header.len() as u16).to_le_bytes());
    npy.extend_from_slice(header.as_bytes());
    let zip = write_stored_zip(&[("e.npy", &npy)]);
    let m = Model::from_bytes("empty", ModelFormat::Npz, zip).unwrap();
    assert_eq!(m.tensors[0].numel, 0);
}

#[test]
fn a_tensor_named_like_the_metadata_key_is_refused_on_export() {
    use prunescope::model::zip::write_stored_zip;
    let dir = common::tempdir("hostile-meta");
    let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }";
    let mut npy = b"\x93NUMPY\x01\x00".to_vec();
    npy.extend_from_slice(&(header.len() as u16).to_le_bytes());
    npy.extend_from_slice(header.as_bytes());
    npy.extend_from_slice(&[0u8; 16]);
    let p = dir.join("meta.npz");
    std::fs::write(&p, write_stored_zip(&[("__metadata__.npy", &npy)])).unwrap();
    let out = dir.join("o.safetensors");
    let o = prune_half(&p, &out);
    assert!(one_line_error(&o).contains("reserved"));
    assert!(!out.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_output_over_an_onnx_models_external_data_is_refused() {
    let dir = common::tempdir("hostile-ext");
    for f in ["mlp_external.onnx", "mlp_external.onnx.data"] {
        std::fs::copy(fixtures().join("onnx").join(f), dir.join(f)).unwrap();
    }
    let data = std::fs::read(dir.join("mlp_external.onnx.data")).unwrap();
    let o = cli_in(
        Some(&dir),
        &[
            "prune",
            "mlp_external.onnx",
            "--sparsity",
            "0.5",
            "--out",
            "./mlp_external.onnx.data",
        ],
        Duration::from_secs(60),
    );
    let e = one_line_error(&o);
    assert!(e.contains("model's data file"), "{e}");
    assert_eq!(
        std::fs::read(dir.join("mlp_external.onnx.data")).unwrap(),
        data
    );
    let _ = std::fs::remove_dir_all(&dir);
}
