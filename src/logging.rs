//! Log lines on stderr, for a terminal or for systemd's journal.
//!
//! On a terminal (or a file, runit, s6): simplelog, an RFC 3339 UTC
//! timestamp and the level on each line. Under systemd with stderr
//! connected to the journal (`$JOURNAL_STREAM` names stderr's device and
//! inode): each line starts with its syslog priority, `<3>` error, `<4>`
//! warn, `<6>` info, `<7>` debug and trace, and carries no timestamp (the
//! journal stamps every line itself), so `journalctl -p warning` works.
//! simplelog cannot write that prefix, hence the small `Journal` logger.
//!
//! Invariant: only skyapi's own records are logged (not those of its
//! dependencies), at most `--log-level`.

use std::io::Write;

use log::{Level, LevelFilter, Log, Metadata, Record};
use simplelog::{ConfigBuilder, WriteLogger};

/// Installs the logger for the process; the first call wins.
pub fn init(level: LevelFilter) {
    if stderr_is_journal(std::env::var("JOURNAL_STREAM").ok().as_deref()) {
        // Only fails if a logger is already set, which nothing here does.
        if log::set_boxed_logger(Box::new(Journal { level })).is_ok() {
            log::set_max_level(level);
        }
        return;
    }
    let config = ConfigBuilder::new()
        .set_time_format_rfc3339()
        .set_thread_level(LevelFilter::Off)
        .set_target_level(LevelFilter::Off)
        .add_filter_allow_str("skyapi")
        .build();
    // Only fails if a logger is already set, which nothing here does.
    let _ = WriteLogger::init(level, config, std::io::stderr());
}

/// Whether `journal_stream` (`$JOURNAL_STREAM`, `DEVICE:INODE`) is the
/// file stderr is. Only the variable would be wrong: systemd sets it for
/// the service, and a process started from it with stderr redirected
/// elsewhere inherits it.
fn stderr_is_journal(journal_stream: Option<&str>) -> bool {
    let Some((dev, ino)) = journal_stream.and_then(|v| v.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    // SAFETY: fstat fills a stat struct we own; fd 2 may be closed, which
    // fails with EBADF and means "not the journal".
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstat(2, &mut st) == 0 && st.st_dev as u64 == dev && st.st_ino as u64 == ino
    }
}

/// The syslog priority of a level, as the journal reads it.
fn priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// `<P>` before every line of `message`: the journal splits on newlines,
/// and a continuation line without the prefix would be logged at info.
fn journal_lines(level: Level, message: &str) -> String {
    let p = priority(level);
    let mut out = String::with_capacity(message.len() + 4);
    for line in message.lines() {
        out.push_str(&format!("<{p}>{line}\n"));
    }
    if out.is_empty() {
        out = format!("<{p}>\n");
    }
    out
}

struct Journal {
    level: LevelFilter,
}

impl Log for Journal {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.level && metadata.target().starts_with("skyapi")
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let text = journal_lines(record.level(), &record.args().to_string());
        // One write per record, so lines of concurrent threads never mix.
        // A failed write to stderr has nowhere to be reported.
        let _ = std::io::stderr().lock().write_all(text.as_bytes());
    }

    fn flush(&self) {
        // Why ignored: as in `log`, nowhere to report it.
        let _ = std::io::stderr().flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_are_syslogs() {
        assert_eq!(journal_lines(Level::Error, "boom"), "<3>boom\n");
        assert_eq!(journal_lines(Level::Warn, "hm"), "<4>hm\n");
        assert_eq!(journal_lines(Level::Info, "ok"), "<6>ok\n");
        assert_eq!(journal_lines(Level::Debug, "d"), "<7>d\n");
        assert_eq!(journal_lines(Level::Trace, "t"), "<7>t\n");
        assert_eq!(journal_lines(Level::Warn, "a\nb"), "<4>a\n<4>b\n");
        assert_eq!(journal_lines(Level::Info, ""), "<6>\n");
    }

    #[test]
    fn journal_only_when_the_variable_names_stderr() {
        assert!(!stderr_is_journal(None));
        assert!(!stderr_is_journal(Some("")));
        assert!(!stderr_is_journal(Some("12:nope")));
        // SAFETY: as in `stderr_is_journal`.
        let st = unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            assert_eq!(libc::fstat(2, &mut st), 0);
            st
        };
        let me = format!("{}:{}", st.st_dev, st.st_ino);
        assert!(stderr_is_journal(Some(&me)));
        let other = format!("{}:{}", st.st_dev, st.st_ino + 1);
        assert!(!stderr_is_journal(Some(&other)));
    }
}
