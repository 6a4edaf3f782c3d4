//! The binary boots against NATS, serves its health endpoints and stops
//! cleanly on SIGTERM; it exits with an error when its address is taken.

conv_nats::binary_boot_tests!(env!("CARGO_BIN_EXE_conv-projections"), "CONV_PROJECTIONS_ADDR");
