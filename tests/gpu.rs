//! The wgpu kernels against the CPU dense kernel, on random and edge-case layers. They run on
//! whatever adapter wgpu finds (Mesa's software one on a machine without a GPU); where there is
//! none, each test says so on stderr and passes without checking anything.
#![cfg(feature = "gpu")]

use prunescope::kernels::gpu::Gpu;
use prunescope::kernels::{Csr, Dense, NmCompressed, remove_rows};
use prunescope::latency::{Kernel, random_input};

fn gpu() -> Option<Gpu> {
    match Gpu::new() {
        Ok(g) => {
            eprintln!("wgpu adapter: {}", g.info().label());
            Some(g)
        }
        Err(e) => {
            eprintln!("SKIPPED: no wgpu adapter here ({e}); the GPU kernels were not checked");
            None
        }
    }
}

fn random(rows: usize, cols: usize, seed: u64, zero_frac: f64) -> Dense {
    Dense::random(rows, cols, seed, zero_frac)
}

fn copy(d: &Dense) -> Dense {
    Dense {
        rows: d.rows,
        cols: d.cols,
        w: d.w.clone(),
    }
}

#[test]
fn gpu_kernels_equal_cpu_dense_on_random_and_edge_cases() {
    let Some(g) = gpu() else { return };
    // Odd shapes around the 16-wide tiles and 64-thread rows; a fully pruned layer; one
    // non-zero; widths not a multiple of M; batches across the tile height.
    let mut cases = vec![
        random(1, 1, 1, 0.0),
        random(17, 33, 2, 0.5),
        random(70, 130, 3, 0.9),
        random(64, 64, 4, 1.0),
        random(5, 203, 6, 0.0),
    ];
    let mut one = random(40, 50, 5, 1.0);
    one.w[7 * 50 + 13] = 2.5;
    cases.push(one);
    // Empty rows among full ones.
    let mut holes = random(48, 96, 7, 0.0);
    for r in (0..48).step_by(3) {
        holes.w[r * 96..(r + 1) * 96].fill(0.0);
    }
    cases.push(holes);
    for d in &cases {
        for batch in [1, 3, 17] {
            let x = random_input(batch * d.cols, batch as u64);
            let tol = 1e-4 * (d.cols as f64).sqrt() * 4.0;
            let err = g.max_err(&Kernel::Dense(copy(d)), d, &x, batch).unwrap();
            assert!(
                err <= tol,
                "dense {}×{} batch {batch}: {err}",
                d.rows,
                d.cols
            );
            let err = g
                .max_err(&Kernel::Csr(Csr::from_dense(d, None)), d, &x, batch)
                .unwrap();
            assert!(err <= tol, "CSR {}×{} batch {batch}: {err}", d.rows, d.cols);
            for (n, m) in [(2, 4), (1, 4), (3, 8)] {
                let nm = NmCompressed::from_dense(d, n, m);
                let reference = nm.to_dense();
                let err = g.max_err(&Kernel::Nm(nm), &reference, &x, batch).unwrap();
                assert!(
                    err <= tol,
                    "{n}:{m} {}×{} batch {batch}: {err}",
                    d.rows,
                    d.cols
                );
            }
            let keep: Vec<bool> = (0..d.rows).map(|r| r % 2 == 1).collect();
            let small = remove_rows(d, &keep);
            if small.rows > 0 {
                let err = g
                    .max_err(&Kernel::Dense(copy(&small)), &small, &x, batch)
                    .unwrap();
                assert!(err <= tol, "rows {}×{}: {err}", small.rows, small.cols);
            }
        }
    }
}

#[test]
fn gpu_timing_reports_a_positive_median() {
    let Some(g) = gpu() else { return };
    let d = random(128, 256, 9, 0.0);
    let k = g.upload(&Kernel::Dense(d)).unwrap();
    let t = g.time(&k, 8, 5.0).unwrap();
    assert!(t.runs >= 9 && t.median_ms > 0.0 && t.min_ms <= t.median_ms && t.median_ms <= t.max_ms);
}

#[test]
fn block_sparse_has_no_gpu_kernel_and_says_so() {
    let Some(g) = gpu() else { return };
    let d = random(8, 8, 1, 0.5);
    let bs = prunescope::kernels::BlockSparse::from_dense(&d, None, 4);
    let err = g.upload(&Kernel::Block(bs)).err().unwrap();
    assert!(err.contains("block-sparse"), "{err}");
}
