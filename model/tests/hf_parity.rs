//! Parity with HuggingFace transformers 5.17.0 on fixtures made by
//! tests/fixtures/make_hf_fixtures.py (random weights, fp32, eval mode): last_hidden_state over
//! non-pad positions, the official EMD + MLM head logits, classification logits.

mod common;

use common::{expected, fixture, fixture_inputs, CASES};
use deberta_model::compare::{max_abs_diff, max_abs_diff_unpadded};
use deberta_model::hf::load_hf_dir;
use tch::Device;

const TOL: f64 = 1e-4;

fn check_case(name: &str) {
    let loaded = load_hf_dir(&fixture(name), Device::Cpu).unwrap();
    assert!(loaded.warnings.is_empty(), "{name}: {:?}", loaded.warnings);
    let model = &loaded.model;
    let (ids, mask) = fixture_inputs(name);
    model.check_inputs(&ids, &mask).unwrap();
    let (hidden, mlm, cls) = tch::no_grad(|| {
        let enc = model.encode(&ids, &mask, false);
        (
            enc.last_hidden_state().shallow_clone(),
            model.mlm_logits(&enc, false),
            model.classify(&enc, false),
        )
    });
    let mut compared = 0;
    for (key, want) in expected(name) {
        let diff = match key.as_str() {
            "last_hidden_state" => max_abs_diff_unpadded(&hidden, &want, &mask),
            "mlm_logits" => max_abs_diff_unpadded(mlm.as_ref().expect("checkpoint has an MLM head"), &want, &mask),
            "logits" => max_abs_diff(cls.as_ref().expect("checkpoint has a classifier"), &want),
            "attention_mask" => continue,
            other => panic!("unexpected fixture tensor {other}"),
        };
        assert!(diff <= TOL, "{name}: {key} differs from HF by {diff:e}");
        compared += 1;
    }
    assert!(compared >= 1, "{name}: nothing compared");
}

#[test]
fn xxlarge_shape_family_with_emd() {
    check_case("xxlarge_family");
}

#[test]
fn padded_batch_of_different_lengths() {
    check_case("padded_batch");
}

#[test]
fn no_conv_no_shared_key_classifier() {
    check_case("no_conv_no_share");
}

#[test]
fn no_relative_attention() {
    check_case("no_relative");
}

#[test]
fn fixtures_exercise_what_they_claim() {
    // Guard against a fixture regenerated with the features the tests rely on switched off.
    let a = deberta_model::DebertaConfig::from_hf_file(&fixture("xxlarge_family").join("config.json")).unwrap();
    assert!(a.share_att_key && a.norm_rel_ebd && a.conv_kernel_size == 3 && a.c2p && a.p2c);
    let (ids, _) = fixture_inputs("xxlarge_family");
    assert!(
        a.position_buckets > 0 && ids.size()[1] > a.position_buckets,
        "bucketing must be active"
    );
    let b = deberta_model::DebertaConfig::from_hf_file(&fixture("no_conv_no_share").join("config.json")).unwrap();
    assert!(!b.share_att_key && b.conv_kernel_size == 0 && b.position_buckets <= 0);
    let (_, mask) = fixture_inputs("padded_batch");
    let lengths: Vec<i64> = Vec::<i64>::try_from(mask.sum_dim_intlist(1, false, tch::Kind::Int64)).unwrap();
    assert!(lengths.iter().any(|&l| l < mask.size()[1]) && lengths.windows(2).any(|w| w[0] != w[1]));
    assert_eq!(CASES.len(), 4);
}
