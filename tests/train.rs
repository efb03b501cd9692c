//! `prunescope train`: reproducible from its seed, and as good as the bundled sample.

use prunescope::data::digits_split;
use prunescope::eval::{Evaluator, evaluator_for};
use prunescope::progress::Progress;
use prunescope::prune::MaskSet;
use prunescope::train::{TrainConfig, train_mlp};

#[test]
fn training_is_reproducible_and_learns() {
    let data = digits_split().unwrap();
    let cfg = TrainConfig {
        epochs: 3,
        ..TrainConfig::default()
    };
    let a = train_mlp(&cfg, &data, &Progress::none()).unwrap();
    let b = train_mlp(&cfg, &data, &Progress::none()).unwrap();
    assert_eq!(a.init, b.init, "same seed, same initial weights");
    assert_eq!(a.trained, b.trained, "same seed, same trained weights");
    let other = train_mlp(
        &TrainConfig {
            seed: 1,
            ..cfg.clone()
        },
        &data,
        &Progress::none(),
    )
    .unwrap();
    assert_ne!(a.init, other.init);
    // Three epochs already beat chance (10%) by far, and the loss falls.
    assert!(
        a.test.accuracy.unwrap() > 0.8,
        "accuracy {:?}",
        a.test.accuracy
    );
    assert!(
        a.epoch_loss.windows(2).all(|w| w[1] < w[0]),
        "{:?}",
        a.epoch_loss
    );
}

#[test]
fn the_bundled_sample_is_what_train_produces() {
    let data = digits_split().unwrap();
    let r = train_mlp(&TrainConfig::default(), &data, &Progress::none()).unwrap();
    let sample = prunescope::sample::open_sample().unwrap();
    let dense = evaluator_for(&sample)
        .unwrap()
        .unwrap()
        .evaluate(&sample, &MaskSet::new())
        .unwrap();
    let (acc, r_acc) = (dense.accuracy.unwrap(), r.test.accuracy.unwrap());
    assert!(acc > 0.95, "sample accuracy {acc}");
    // Same recipe, same accuracy within a few test images (float summation order may
    // differ between CPUs, so weights are compared loosely).
    assert!((r_acc - acc).abs() <= 3.0 / 360.0, "{r_acc} vs {acc}");
    for (name, _shape, values) in &r.trained {
        let t = sample.find(name).unwrap();
        let s = sample.to_f32_vec(t);
        let max = s
            .iter()
            .zip(values)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(max < 1e-2, "{name}: max difference {max}");
    }
}
