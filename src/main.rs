//! The `edgeact` binary: parses the command line, runs it, and maps the error to an exit
//! code; everything else is the library's [`edgeact::cli`] and [`edgeact::cmd`].

use std::process::ExitCode;

use clap::Parser;

use edgeact::cli;

fn main() -> ExitCode {
    // Before anything else: it may start this binary again with the threads' wait setting.
    cli::threads::set_thread_wait();
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
