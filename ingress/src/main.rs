//! The `conv-ingress` binary: see the library for everything it does.

fn main() -> std::process::ExitCode {
    conv_nats::service::main(&conv_ingress::IDENTITY, conv_ingress::run)
}
