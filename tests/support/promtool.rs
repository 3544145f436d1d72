//! `promtool` (Debian package prometheus): the reference checker of the
//! Prometheus text format and the runner of the alert rules' unit tests.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

pub const PROMTOOL: &str = "/usr/bin/promtool";

/// Runs `promtool ARGS` with `stdin`; panics, naming the package, if
/// promtool is not installed.
pub fn promtool(args: &[&str], stdin: &str, dir: Option<&Path>) -> Output {
    assert!(
        Path::new(PROMTOOL).exists(),
        "{PROMTOOL} not found: install the Debian package prometheus (make deps does)"
    );
    let mut cmd = Command::new(PROMTOOL);
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(dir) = dir {
        cmd.current_dir(dir);
    }
    let mut child = cmd.spawn().expect("run promtool");
    child
        .stdin
        .take()
        .expect("promtool stdin")
        .write_all(stdin.as_bytes())
        .expect("feed promtool");
    child.wait_with_output().expect("wait for promtool")
}

/// `promtool check metrics` on an exposition: format and lint (HELP and
/// TYPE for every family, counters named `_total`, well-formed histograms,
/// no repeated series); panics with its findings and the text.
pub fn check_metrics(text: &str) {
    let out = promtool(&["check", "metrics"], text, None);
    assert!(
        out.status.success(),
        "promtool check metrics: {}\n{}{}\n--- the exposition\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
