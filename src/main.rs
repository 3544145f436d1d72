//! Entry point: parse flags, set up logging, run the server or the sidecar,
//! map the outcome to an exit code (0 after a clean shutdown, 1 on a runtime
//! failure, 2 on a bad command line).

use std::process::ExitCode;

use log::LevelFilter;
use simplelog::{ConfigBuilder, WriteLogger};
use skyapi::config::{self, Command};

fn main() -> ExitCode {
    let env = |name: &str| std::env::var(name).ok();
    let result = match config::parse(std::env::args_os().skip(1).collect(), &env) {
        Ok(Command::Serve(c)) => {
            init_logging(c.log_level);
            skyapi::server::run(*c)
        }
        Ok(Command::Provide(c)) => {
            init_logging(c.log_level);
            skyapi::sidecar::run(c)
        }
        Ok(Command::Help) => {
            print!("{}", config::USAGE);
            Ok(())
        }
        Ok(Command::ProvideHelp) => {
            print!("{}", config::PROVIDE_USAGE);
            Ok(())
        }
        Ok(Command::Version) => {
            println!("skyapi {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Err(e) => {
            eprintln!("skyapi: {e}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr (supervisors collect it), RFC 3339 UTC timestamps.
fn init_logging(level: LevelFilter) {
    let config = ConfigBuilder::new()
        .set_time_format_rfc3339()
        .set_thread_level(LevelFilter::Off)
        .set_target_level(LevelFilter::Off)
        .add_filter_allow_str("skyapi")
        .build();
    // Only fails if a logger is already set, which nothing here does.
    let _ = WriteLogger::init(level, config, std::io::stderr());
}
