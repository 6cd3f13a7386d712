//! The `edgeact` binary: parses the command line, runs it, and maps the error to an exit
//! code; everything else is the library's [`edgeact::cli`] and [`edgeact::cmd`].

use std::process::ExitCode;

use clap::Parser;

use edgeact::cli;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    cli::init_logging(args.verbose);
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edgeact: {e}");
            ExitCode::from(cli::exit_code(&e))
        }
    }
}
