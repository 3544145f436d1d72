//! Entry point: parse flags, set up logging, run the server or the sidecar,
//! map the outcome to an exit code (0 after a clean shutdown, 1 on a runtime
//! failure, 2 on a bad command line).

use std::process::ExitCode;

use skyapi::config::{self, Command};
use skyapi::logging::init as init_logging;

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
