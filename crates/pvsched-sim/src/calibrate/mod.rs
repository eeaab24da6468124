//! Calibration against the lab: run the lab's configuration in simulation
//! and put simulated and measured figures side by side.
//!
//! The lab's `results.json` is read tolerantly (unknown keys ignored); a
//! missing field that the comparison needs is a clear error naming it. Two
//! experiments are understood: the latency experiment (cyclictest, this
//! module) and the overcommit experiment (hackbench scores per VM,
//! [`overcommit`]); [`calibrate_lab`] tells them apart.

pub mod latency;
pub mod overcommit;

pub use latency::{
    calibrate, fit, parse, scenario, Calibration, LabConfig, LabParams, ModelParams, Options,
};

use serde::Serialize;
use serde_json::Value;

/// Why the lab's results cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CalibrateError {
    /// Not JSON.
    #[error("lab results are not JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A field the comparison needs is missing or has the wrong type.
    #[error("lab results: missing or invalid field `{0}`")]
    Field(String),
    /// Model parameters (a `--params` file) are not valid.
    #[error("model parameters: {0}")]
    Params(String),
    /// The simulation failed.
    #[error("simulation: {0}")]
    Sim(#[from] crate::ScenarioError),
}

/// The comparison for either experiment.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "experiment", rename_all = "kebab-case")]
pub enum Report {
    /// The latency experiment (cyclictest in the guest and on the host).
    Latency(Calibration),
    /// The overcommit experiment (hackbench scores per VM).
    Overcommit(overcommit::OvercommitCalibration),
}

impl Report {
    /// Side-by-side tables.
    pub fn table(&self) -> String {
        match self {
            Report::Latency(c) => c.table(),
            Report::Overcommit(c) => c.table(),
        }
    }
}

/// Reads a lab `results.json` of either experiment (an overcommit one is told by
/// its `experiment` field or by per-configuration `vms` arrays), simulates it and
/// compares. `opt.max_duration_s` caps the simulated window; a latency result is
/// fitted on its baseline configurations unless `opt.params` are given.
pub fn calibrate_lab(text: &str, opt: &Options) -> Result<Report, CalibrateError> {
    let v: Value = serde_json::from_str(text)?;
    if overcommit::is_overcommit(&v) {
        overcommit::calibrate_value(&v, opt.seed, opt.max_duration_s).map(Report::Overcommit)
    } else {
        calibrate(text, opt).map(Report::Latency)
    }
}

pub(crate) fn get<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    let mut cur = v;
    for key in path.split('.') {
        cur = cur.get(key)?;
    }
    Some(cur)
}

pub(crate) fn num(v: &Value, path: &str) -> Result<f64, CalibrateError> {
    get(v, path)
        .and_then(Value::as_f64)
        .ok_or_else(|| CalibrateError::Field(path.into()))
}

pub(crate) fn opt_num(v: &Value, path: &str) -> Option<f64> {
    get(v, path).and_then(Value::as_f64)
}

pub(crate) fn rel(sim: Option<f64>, meas: Option<f64>) -> Option<f64> {
    match (sim, meas) {
        (Some(s), Some(m)) if m.abs() > 1e-9 => Some((s - m) / m),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_fields_are_named() {
        let e =
            parse(r#"{"params": {"vcpus": 2, "interval_us": 1000}, "configs": {}}"#).unwrap_err();
        assert!(e.to_string().contains("duration_s"), "{e}");
        let e = parse(
            r#"{"params": {"vcpus": 2, "interval_us": 1000, "duration_s": 5},
                "configs": {"vanilla": {"guest": {"avg_us": 1, "p99_us": 2, "samples": 3}}}}"#,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("configs.vanilla.guest.max_us"),
            "{e}"
        );
        assert!(matches!(parse("nope"), Err(CalibrateError::Json(_))));
    }

    #[test]
    fn list_and_map_forms_parse() {
        let text = r#"{"accelerator": "tcg", "params": {"vcpus": 2, "interval_us": 1000, "duration_s": 5,
            "load": {"cpu": 2, "iomix": 1, "vm": 1, "vm_mib": 128, "fork": 1}, "extra": true},
            "configs": [{"name": "pvsched", "guest": {"avg_us": 10, "p99_us": 20, "max_us": 30, "samples": 100},
                         "host": {"max_us": 5}, "boosts": 7, "throttles": 0}]}"#;
        let (p, c) = parse(text).unwrap();
        assert_eq!(p.load, [2, 1, 1, 1]);
        assert_eq!(p.accelerator, "tcg");
        assert_eq!(c[0].name, "pvsched");
        assert_eq!(c[0].boosts, Some(7));
        assert_eq!(c[0].host_bogo_ops_per_s, None);
    }
}
