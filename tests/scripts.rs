//! The Python that `scripts/bench.sh` runs (`scripts/bench_report.py`: the
//! figures and BENCHMARKS.md) has unit tests of its own; this runs them with
//! the rest of the suite, so `scripts/test.sh` covers them.

use std::process::Command;

#[test]
fn bench_report_python_tests_pass() {
    let output = Command::new("python3")
        .args([
            "-m",
            "unittest",
            "discover",
            "-s",
            "scripts",
            "-p",
            "test_*.py",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("python3 runs (scripts/setup.sh installs it)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    // unittest reports "Ran N tests"; a discovery that found none must fail too.
    let ran: usize = stderr
        .lines()
        .find_map(|l| l.strip_prefix("Ran ")?.split(' ').next()?.parse().ok())
        .unwrap_or(0);
    assert!(ran > 0, "no tests found in scripts/: {stderr}");
}
