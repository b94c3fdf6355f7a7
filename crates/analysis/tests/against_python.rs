//! The out-of-distribution and calibration metrics against scikit-learn's, SciPy's and
//! PyTorch's on the same numbers (`scripts/write_analysis_fixture.py` wrote the fixture:
//! scores with many ties, a set whose scores are all tied, and random logits).

use cutmix_analysis::calibration::{calibration, fit_temperature};
use cutmix_analysis::ood::Detection;
use serde_json::Value;

fn fixture() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/ood_calibration.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn floats(value: &Value) -> Vec<f32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect()
}

fn close(name: &str, ours: f64, theirs: &Value) {
    let theirs = theirs.as_f64().unwrap();
    assert!(
        (ours - theirs).abs() < 1e-9,
        "{name}: ours {ours}, theirs {theirs}"
    );
}

#[test]
fn detection_metrics_equal_scikit_learns_with_ties() {
    let fixture = fixture();
    for (name, set) in fixture["ood"].as_object().unwrap() {
        let d = Detection::of(&floats(&set["in"]), &floats(&set["out"]));
        let want = &set["expected"];
        close(&format!("{name} auroc"), d.auroc, &want["auroc"]);
        close(
            &format!("{name} tnr"),
            d.tnr_at_tpr95,
            &want["tnr_at_tpr95"],
        );
        close(
            &format!("{name} acc"),
            d.detection_acc,
            &want["detection_acc"],
        );
        close(&format!("{name} aupr_in"), d.aupr_in, &want["aupr_in"]);
        close(&format!("{name} aupr_out"), d.aupr_out, &want["aupr_out"]);
    }
}

#[test]
fn calibration_equals_pytorchs_and_the_fitted_temperature_scipys() {
    let fixture = fixture();
    let cal = &fixture["calibration"];
    let classes = cal["classes"].as_u64().unwrap() as usize;
    let logits = floats(&cal["logits"]);
    let labels: Vec<usize> = cal["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    for (key, temperature) in [("at_1", 1.0), ("at_2", 2.0)] {
        let c = calibration(&logits, classes, &labels, temperature, 15);
        let want = &cal[key];
        close(&format!("{key} ece"), c.ece, &want["ece"]);
        close(&format!("{key} nll"), c.nll, &want["nll"]);
        close(&format!("{key} brier"), c.brier, &want["brier"]);
        close(&format!("{key} top1"), c.top1_err, &want["top1_err"]);
        assert_eq!(c.bins.iter().map(|b| b.count).sum::<usize>(), labels.len());
    }
    let t = fit_temperature(&logits, classes, &labels);
    let theirs = cal["fitted_temperature"].as_f64().unwrap();
    assert!((t - theirs).abs() < 1e-5, "ours {t}, SciPy's {theirs}");
}
