//! The `conv-runtime` binary: see the library for everything it does.

fn main() -> std::process::ExitCode {
    conv_nats::service::main(&conv_runtime::IDENTITY, conv_runtime::run)
}
