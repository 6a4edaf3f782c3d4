//! `convctl`: parse, run, print, exit. See the library for the commands.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = conv_ops::cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("convctl: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(conv_ops::run(cli)) {
        Ok(outcome) => {
            if !outcome.output.is_empty() {
                println!("{}", outcome.output);
            }
            ExitCode::from(outcome.code)
        }
        Err(e) => {
            eprintln!("convctl: {e}");
            ExitCode::FAILURE
        }
    }
}
