//! The test harness itself and the shipped server configs.

use std::path::Path;

use conv_nats::test_util::{Backend, TestNats};

#[tokio::test]
async fn backend_follows_conv_test_nats() {
    let nats = TestNats::start().await.expect("test NATS");
    match std::env::var("CONV_TEST_NATS").as_deref() {
        // scripts/test.sh sets this when Docker answers: the suite must then
        // really run on containers, never silently on processes.
        Ok("container") => assert_eq!(nats.backend(), Backend::Container),
        Ok("process") => assert_eq!(nats.backend(), Backend::Process),
        _ => {}
    }
    let js = nats.jetstream().await;
    let account = js.query_account().await.expect("JetStream enabled");
    assert_eq!(account.streams, 0, "every test gets a fresh server");
}

#[tokio::test]
async fn process_backend_removes_its_storage_on_drop() {
    let nats = TestNats::start_process().await.expect("nats-server process");
    nats.setup().await.expect("setup");
    let dir = nats.store_dir().expect("a process has a store dir");
    assert!(dir.join("jetstream").exists(), "JetStream stores under {}", dir.display());
    let addr = nats.url().trim_start_matches("nats://").to_owned();
    drop(nats);
    assert!(!dir.exists(), "storage removed on drop");
    assert!(std::net::TcpStream::connect(&addr).is_err(), "server stopped on drop");
}

#[test]
fn server_configs_are_valid() {
    let bin = std::env::var("CONV_NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".into());
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    for name in ["single.conf", "cluster-1.conf", "cluster-2.conf", "cluster-3.conf"] {
        let path = dir.join(name);
        let mut command = std::process::Command::new(&bin);
        // The shipped configs read each user's password from the environment.
        for user in conv_nats::test_util::USERS {
            command.env(format!("CONV_NATS_{}_PASSWORD", user.to_uppercase()), "test");
        }
        let out = command
            .arg("-t")
            .arg("-c")
            .arg(&path)
            .output()
            .unwrap_or_else(|e| panic!("run {bin} (install with scripts/ensure-nats.sh): {e}"));
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
    }
    // Without the passwords the server refuses to start: nothing runs open by mistake.
    let out = std::process::Command::new(&bin)
        .env_remove("CONV_NATS_ADMIN_PASSWORD")
        .arg("-t")
        .arg("-c")
        .arg(dir.join("single.conf"))
        .output()
        .expect("run nats-server");
    assert!(!out.status.success(), "single.conf started without CONV_NATS_ADMIN_PASSWORD");
}
