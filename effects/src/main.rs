//! The `conv-effects` binary: see the library for everything it does.

fn main() -> std::process::ExitCode {
    conv_nats::service::main(&conv_effects::IDENTITY, conv_effects::run)
}
