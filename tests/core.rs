//! Core algorithms against independent, simpler computations.

use prunescope::analysis::{histogram, size_report, split_histogram};
use prunescope::model::Model;
use prunescope::progress::Progress;
use prunescope::prune::{
    Criterion, LayerSettings, Pattern, PruneSettings, Scope, ScoreIndex, ScoreInputs, allocate,
    build_masks, prune,
};
use prunescope::util::SplitMix64;

/// Rank used by the reference: |w| as f64, NaN below everything. No keys, no bit tricks.
fn rank(w: f32) -> f64 {
    if w.is_nan() { -1.0 } else { (w as f64).abs() }
}

/// A random model with adversarial content: ties, zeros, NaN, ±Inf, tiny and 1-D tensors.
fn random_model(rng: &mut SplitMix64) -> Model {
    let n_tensors = 1 + rng.below(5) as usize;
    let mut tensors = Vec::new();
    for i in 0..n_tensors {
        let shape = match rng.below(4) {
            0 => vec![1 + rng.below(3) as usize, 1 + rng.below(9) as usize],
            1 => vec![1 + rng.below(6) as usize, 1 + rng.below(12) as usize],
            2 => vec![
                1 + rng.below(3) as usize,
                1 + rng.below(5) as usize,
                1 + rng.below(3) as usize,
                1 + rng.below(2) as usize,
            ],
            _ => vec![1 + rng.below(40) as usize, 8],
        };
        let n: usize = shape.iter().product();
        let tie_heavy = rng.below(2) == 0;
        let vals = (0..n)
            .map(|_| match rng.below(40) {
                0 => f32::NAN,
                1 => f32::INFINITY,
                2 => f32::NEG_INFINITY,
                3 => 0.0,
                4 => -0.0,
                _ if tie_heavy => (rng.below(5) as f32 - 2.0) * 0.5,
                _ => rng.normal() as f32,
            })
            .collect();
        tensors.push((format!("layer.{i}.weight"), shape, vals));
    }
    Model::from_f32_tensors("random", tensors)
}

/// Reference for global scope: walk every weight in (rank, layer, index) order and prune it
/// unless its layer is at its cap, until `k` are pruned.
fn reference_global(model: &Model, settings: &PruneSettings) -> Vec<Vec<bool>> {
    let layers: Vec<usize> = (0..model.tensors.len())
        .filter(|&t| settings.is_prunable(model, t))
        .collect();
    let mut all = Vec::new();
    let mut caps = Vec::new();
    let mut total = 0usize;
    for (li, &t) in layers.iter().enumerate() {
        let v = model.to_f32_vec(t);
        let n = v.len();
        total += n;
        let ls = settings.layer(&model.tensors[t].name);
        let keep = settings.min_keep.max(1.0 - ls.max_sparsity.unwrap_or(1.0));
        let min_kept = ((keep * n as f64) - 1e-9).ceil().max(0.0) as usize;
        caps.push(if ls.locked { 0 } else { n - min_kept.min(n) });
        for (i, w) in v.into_iter().enumerate() {
            all.push((rank(w), li, i));
        }
    }
    all.sort_by(|a, b| {
        a.0.partial_cmp(&b.0)
            .unwrap()
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(&b.2))
    });
    let k = (settings.sparsity * total as f64).round() as usize;
    let mut kept: Vec<Vec<bool>> = layers
        .iter()
        .map(|&t| vec![true; model.tensors[t].numel])
        .collect();
    let mut used = vec![0usize; layers.len()];
    let mut pruned = 0;
    for (_, li, i) in all {
        if pruned == k {
            break;
        }
        if used[li] < caps[li] {
            kept[li][i] = false;
            used[li] += 1;
            pruned += 1;
        }
    }
    kept
}

fn masks_as_bools(model: &Model, settings: &PruneSettings) -> Vec<Vec<bool>> {
    let p = prune(model, settings, &ScoreInputs::default(), &Progress::none()).unwrap();
    p.alloc
        .layers
        .iter()
        .map(|l| {
            let m = p.masks.get(&model.tensors[l.tensor].name).unwrap();
            (0..m.len()).map(|i| m.kept(i)).collect()
        })
        .collect()
}

#[test]
fn global_magnitude_matches_brute_force_with_ties_nan_and_caps() {
    let mut rng = SplitMix64::new(1);
    for case in 0..300 {
        let model = random_model(&mut rng);
        let mut s = PruneSettings {
            sparsity: [0.0, 0.1, 0.5, 0.77, 0.9, 1.0][rng.below(6) as usize],
            ..Default::default()
        };
        if rng.below(2) == 0 {
            s.min_keep = [0.05, 0.3, 0.5][rng.below(3) as usize];
        }
        for t in &model.tensors {
            match rng.below(6) {
                0 => s.layer_mut(&t.name).locked = true,
                1 => s.layer_mut(&t.name).max_sparsity = Some(rng.next_f64()),
                _ => {}
            }
        }
        let got = masks_as_bools(&model, &s);
        let want = reference_global(&model, &s);
        assert_eq!(got, want, "case {case}: settings {s:?}");
    }
}

#[test]
fn global_prunes_exactly_round_s_n_and_thresholds_are_largest_pruned() {
    let mut rng = SplitMix64::new(2);
    for _ in 0..100 {
        let model = random_model(&mut rng);
        let s = PruneSettings {
            sparsity: rng.next_f64(),
            ..Default::default()
        };
        let p = prune(&model, &s, &ScoreInputs::default(), &Progress::none()).unwrap();
        let n: u64 = p.alloc.prunable;
        assert_eq!(p.alloc.pruned, (s.sparsity * n as f64).round() as u64);
        assert_eq!(p.masks.total_kept(), n - p.alloc.pruned);
        for l in &p.alloc.layers {
            let v = model.to_f32_vec(l.tensor);
            let m = p.masks.get(&model.tensors[l.tensor].name).unwrap();
            let max_pruned = (0..v.len())
                .filter(|&i| !m.kept(i))
                .map(|i| rank(v[i]))
                .fold(f64::NEG_INFINITY, f64::max);
            match l.threshold {
                None => assert_eq!(l.pruned, 0),
                Some(t) => assert_eq!(rank(t), max_pruned),
            }
        }
    }
}

#[test]
fn layerwise_matches_per_layer_full_sort() {
    let mut rng = SplitMix64::new(3);
    for _ in 0..200 {
        let model = random_model(&mut rng);
        let mut s = PruneSettings {
            scope: Scope::Layer,
            ..Default::default()
        };
        for t in &model.tensors {
            *s.layer_mut(&t.name) = LayerSettings {
                sparsity: rng.next_f64(),
                locked: rng.below(5) == 0,
                ..Default::default()
            };
        }
        let got = masks_as_bools(&model, &s);
        for (li, t) in model.tensors.iter().enumerate() {
            let v = model.to_f32_vec(li);
            let ls = s.layer(&t.name);
            let p = if ls.locked {
                0
            } else {
                (ls.sparsity * v.len() as f64).round() as usize
            };
            let mut order: Vec<usize> = (0..v.len()).collect();
            order.sort_by(|&a, &b| rank(v[a]).partial_cmp(&rank(v[b])).unwrap().then(a.cmp(&b)));
            let mut want = vec![true; v.len()];
            for &i in &order[..p] {
                want[i] = false;
            }
            assert_eq!(got[li], want, "{}", t.name);
        }
    }
}

/// Reference N:M: gather each group explicitly by shape indices, prune the lowest (rank, index).
fn reference_nm(shape: &[usize], v: &[f32], n: usize, m: usize) -> Vec<bool> {
    let (d0, d1, rest) = match shape {
        [a] => (1, *a, 1),
        [a, b, r @ ..] => (*a, *b, r.iter().product()),
        [] => (1, 1, 1),
    };
    let mut kept = vec![true; v.len()];
    for o in 0..d0 {
        for r in 0..rest {
            for g0 in (0..d1).step_by(m) {
                let mut group: Vec<usize> = (g0..(g0 + m).min(d1))
                    .map(|i| (o * d1 + i) * rest + r)
                    .collect();
                group
                    .sort_by(|&a, &b| rank(v[a]).partial_cmp(&rank(v[b])).unwrap().then(a.cmp(&b)));
                let drop = group.len().saturating_sub(n);
                for &i in &group[..drop] {
                    kept[i] = false;
                }
            }
        }
    }
    kept
}

#[test]
fn nm_matches_explicit_groups_including_conv_and_partial_groups() {
    let mut rng = SplitMix64::new(4);
    for &(n, m) in &[(2usize, 4usize), (4, 8), (1, 3), (3, 5), (1, 2)] {
        for _ in 0..60 {
            let model = random_model(&mut rng);
            let s = PruneSettings {
                pattern: Pattern::NM { n, m },
                ..Default::default()
            };
            let got = masks_as_bools(&model, &s);
            for (t, e) in model.tensors.iter().enumerate() {
                let want = reference_nm(&e.shape, &model.to_f32_vec(t), n, m);
                assert_eq!(got[t], want, "{n}:{m} {} {:?}", e.name, e.shape);
            }
        }
    }
}

#[test]
fn two_four_on_a_hand_worked_row() {
    let model = Model::from_f32_tensors(
        "t",
        vec![(
            "w".into(),
            vec![1, 8],
            vec![0.1, -0.9, 0.5, 0.2, 1.0, 1.0, -1.0, f32::NAN],
        )],
    );
    let s = PruneSettings {
        pattern: Pattern::NM { n: 2, m: 4 },
        ..Default::default()
    };
    // Group 1: keep -0.9 and 0.5. Group 2: NaN goes first, then the first of three equal 1.0s.
    assert_eq!(
        masks_as_bools(&model, &s)[0],
        vec![false, true, true, false, false, true, true, false]
    );
}

#[test]
fn random_criterion_is_seeded_and_hits_the_target() {
    let model = Model::from_f32_tensors(
        "t",
        vec![
            ("a".into(), vec![50, 40], vec![1.0; 2000]),
            ("b".into(), vec![10, 10], vec![1.0; 100]),
        ],
    );
    let mut s = PruneSettings {
        criterion: Criterion::Random,
        sparsity: 0.3,
        seed: 9,
        ..Default::default()
    };
    let a = masks_as_bools(&model, &s);
    assert_eq!(a, masks_as_bools(&model, &s), "same seed, same mask");
    assert_eq!(a.iter().flatten().filter(|k| !**k).count(), 630);
    s.seed = 10;
    assert_ne!(a, masks_as_bools(&model, &s), "another seed, another mask");
}

#[test]
fn allocation_reports_unreachable_targets() {
    let model = Model::from_f32_tensors(
        "t",
        vec![(
            "a".into(),
            vec![10, 10],
            (0..100).map(|i| i as f32).collect(),
        )],
    );
    let s = PruneSettings {
        sparsity: 0.9,
        min_keep: 0.5,
        ..Default::default()
    };
    let idx = ScoreIndex::build(
        &model,
        Criterion::Magnitude,
        0,
        &ScoreInputs::default(),
        &Progress::none(),
    )
    .unwrap();
    let a = allocate(&model, &idx, &s);
    assert_eq!((a.requested, a.pruned, a.reached()), (90, 50, false));
    assert!(a.layers[0].capped);
    let masks = build_masks(&model, &idx, &s, &a, &Progress::none()).unwrap();
    assert_eq!(masks.total_kept(), 50);
}

#[test]
fn histogram_split_sums_to_mask_counts() {
    let mut rng = SplitMix64::new(5);
    let model = random_model(&mut rng);
    let s = PruneSettings {
        sparsity: 0.6,
        ..Default::default()
    };
    let p = prune(&model, &s, &ScoreInputs::default(), &Progress::none()).unwrap();
    for l in &p.alloc.layers {
        let h = histogram(&model, l.tensor, 101);
        let m = p.masks.get(&model.tensors[l.tensor].name);
        let sp = split_histogram(&model, l.tensor, &h, m);
        let kept: u64 = sp.kept.iter().sum::<u64>() + sp.non_finite_kept;
        assert_eq!(kept as usize, l.kept());
        for b in 0..h.bins() {
            assert_eq!(sp.kept[b] + sp.pruned[b], h.counts[b]);
        }
    }
}

#[test]
fn size_report_matches_hand_computation() {
    // One 4×8 f32 weight (prunable) and one 8-element bias (not prunable).
    let model = Model::from_f32_tensors(
        "t",
        vec![
            (
                "fc.weight".into(),
                vec![4, 8],
                (1..=32).map(|i| i as f32).collect(),
            ),
            ("fc.bias".into(), vec![8], vec![0.0; 8]),
        ],
    );
    let s = PruneSettings {
        pattern: Pattern::NM { n: 2, m: 4 },
        ..Default::default()
    };
    let p = prune(&model, &s, &ScoreInputs::default(), &Progress::none()).unwrap();
    let r = size_report(&model, &p.alloc, s.pattern);
    let bias = 32;
    assert_eq!(r.dense_bytes, 128 + bias);
    // 16 kept: values 64 B + col idx 64 B + 5 row pointers 20 B.
    assert_eq!(r.csr_bytes, 64 + 64 + 20 + bias);
    // 32 bits of mask = 4 B + 64 B values.
    assert_eq!(r.bitmask_bytes, 4 + 64 + bias);
    // 16 values + 2 bits each = 64 + 4.
    assert_eq!(r.nm_bytes, Some(64 + 4 + bias));
}
