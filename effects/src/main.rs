//! The `conv-effects` binary: see the library for everything it does.

/// jemalloc, whose background thread gives freed memory back to the system
/// (ADR 0010).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    conv_nats::service::main(&conv_effects::IDENTITY, conv_effects::run)
}
