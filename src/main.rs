//! Entry point: parse flags, set up logging, run, map the outcome to an
//! exit code (0 after a clean shutdown, 1 on a runtime failure, 2 on a bad
//! command line).

use std::process::ExitCode;

use simplelog::{ConfigBuilder, WriteLogger};
use skyapi::config::{self, Command};

fn main() -> ExitCode {
    let config = match config::parse(std::env::args_os().skip(1).collect()) {
        Ok(Command::Serve(c)) => c,
        Ok(Command::Help) => {
            print!("{}", config::USAGE);
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("skyapi {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("skyapi: {e}");
            return ExitCode::from(2);
        }
    };
    let log_config = ConfigBuilder::new()
        .set_time_format_rfc3339()
        .set_thread_level(log::LevelFilter::Off)
        .set_target_level(log::LevelFilter::Off)
        .add_filter_allow_str("skyapi")
        .build();
    // Only fails if a logger is already set, which nothing here does.
    let _ = WriteLogger::init(config.log_level, log_config, std::io::stderr());

    match skyapi::server::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
