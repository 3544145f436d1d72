//! The `openssl` steps behind the throwaway PKIs of the hostile and
//! operate suites (each suite's `Pki` picks the certificates it needs): a CA
//! and end-entity certificates it signs, all EC P-256 with PKCS#8 keys,
//! valid for two days, as PEM files in one directory.

use std::path::Path;
use std::process::{Command, Stdio};

/// Runs `openssl ARGS` in `dir`; panics with its stderr if it fails.
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running openssl (Debian package openssl): {e}"));
    assert!(
        out.status.success(),
        "openssl {args:?}: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A new EC P-256 key without passphrase (`openssl req` arguments).
const EC_KEY: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
];

/// Makes a self-signed CA in `dir`: `ca.pem` and `ca.key`.
pub fn make_ca(dir: &Path) {
    openssl(
        dir,
        &[
            &["req", "-x509", "-days", "2"],
            &EC_KEY[..],
            &["-keyout", "ca.key", "-out", "ca.pem"],
            &["-subj", "/CN=skyapi test CA"],
            &["-addext", "basicConstraints=critical,CA:TRUE"],
            &["-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ]
        .concat(),
    );
}

/// Issues `NAME.pem` and `NAME.key` in `dir`, signed by the CA
/// [`make_ca`] made there, for `subject` with the X.509 extensions `ext`
/// (an `openssl x509 -extfile`, one per line).
pub fn issue(dir: &Path, name: &str, subject: &str, ext: &str) {
    let (key, csr, pem, ext_file) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.pem"),
        format!("{name}.ext"),
    );
    std::fs::write(dir.join(&ext_file), ext).expect("write extensions file");
    openssl(
        dir,
        &[
            &["req"][..],
            &EC_KEY[..],
            &["-keyout", &key, "-out", &csr, "-subj", subject],
        ]
        .concat(),
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &pem,
            "-extfile",
            &ext_file,
        ],
    );
}
