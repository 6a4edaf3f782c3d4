//! `contracts` owns what is on the wire: no other crate's `src/` spells a
//! `conv.` subject or event type, and the shipped `convctl` links neither
//! the ingress nor the effects service. These read the workspace's files,
//! so a change that breaks the rule fails here, not in review.

use std::path::{Path, PathBuf};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace").to_path_buf()
}

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The `src/` folders of every crate but `contracts`.
fn other_crates_sources() -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(workspace()).expect("the workspace").flatten() {
        let src = entry.path().join("src");
        let name = entry.file_name();
        if src.is_dir() && name != "contracts" && name != "target" && entry.path().join("Cargo.toml").is_file() {
            sources(&src, &mut files);
        }
    }
    assert!(files.len() > 40, "found the crates' sources: {}", files.len());
    files
}

#[test]
fn no_subject_or_event_type_literal_outside_contracts() {
    let needle = ["\"", "conv."].concat();
    let mut found = Vec::new();
    for file in other_crates_sources() {
        let text = std::fs::read_to_string(&file).expect("readable");
        for (n, line) in text.lines().enumerate() {
            if line.contains(&needle) {
                found.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(found.is_empty(), "wire names belong in conv_contracts::subject / EventType:\n{}", found.join("\n"));
}

#[test]
fn convctl_links_neither_ingress_nor_effects() {
    let manifest = std::fs::read_to_string(workspace().join("ops-cli/Cargo.toml")).expect("ops-cli/Cargo.toml");
    let dependencies =
        manifest.split("\n[").find(|section| section.starts_with("dependencies]")).expect("a [dependencies] section");
    for service in ["conv-ingress", "conv-effects", "conv-runtime"] {
        assert!(!dependencies.contains(service), "convctl depends on {service}");
    }
}
