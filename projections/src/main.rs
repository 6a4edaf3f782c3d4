//! The `conv-projections` binary: see the library for everything it does.

fn main() -> std::process::ExitCode {
    conv_nats::service::main(&conv_projections::IDENTITY, conv_projections::run)
}
