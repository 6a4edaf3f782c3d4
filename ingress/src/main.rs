//! The `conv-ingress` binary: see the library for everything it does.

/// jemalloc, whose background thread gives freed memory back to the system,
/// so a connection flood does not leave the process at its peak (ADR 0010).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    conv_nats::service::main(&conv_ingress::IDENTITY, conv_ingress::run)
}
