//! Rules of the workspace's layout, checked on its files so a change that
//! breaks one fails here, not in review: `contracts` owns what is on the
//! wire (no other crate's `src/` spells a `conv.` subject or event type);
//! the shipped `convctl` links neither the ingress nor the effects service;
//! errors are typed (no `Result<_, String>` in any `src/`).

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

/// The `src/` files of every crate but those named in `except`.
fn crate_sources(except: &[&str]) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(workspace()).expect("the workspace").flatten() {
        let src = entry.path().join("src");
        let name = entry.file_name();
        let skipped = except.iter().any(|e| name == *e);
        if src.is_dir() && !skipped && entry.path().join("Cargo.toml").is_file() {
            sources(&src, &mut files);
        }
    }
    assert!(files.len() > 40, "found the crates' sources: {}", files.len());
    files
}

/// The error type of each `Result<…>` in `text` that is `String`, with its line.
fn string_errors(text: &str) -> Vec<usize> {
    let mut found = Vec::new();
    let bytes = text.as_bytes();
    let mut from = 0;
    while let Some(at) = text[from..].find("Result<") {
        let start = from + at + "Result<".len();
        let boundary =
            from + at == 0 || !(bytes[from + at - 1].is_ascii_alphanumeric() || bytes[from + at - 1] == b'_');
        // The last argument at depth 0, up to the closing `>`.
        let (mut depth, mut args, mut arg, mut i) = (0i32, Vec::new(), start, start);
        while i < bytes.len() {
            match bytes[i] {
                b'<' | b'(' | b'[' => depth += 1,
                b'>' if depth == 0 => break,
                b'>' | b')' | b']' => depth -= 1,
                b',' if depth == 0 => {
                    args.push(text[arg..i].trim());
                    arg = i + 1;
                }
                _ => {}
            }
            i += 1;
        }
        if i < bytes.len() {
            args.push(text[arg..i].trim());
        }
        // A trailing comma leaves an empty last argument.
        let error = args.iter().rev().find(|a| !a.is_empty());
        if boundary && args.len() >= 2 && error == Some(&"String") {
            found.push(text[..start].lines().count());
        }
        from = start;
    }
    found
}

#[test]
fn no_subject_or_event_type_literal_outside_contracts() {
    let needle = ["\"", "conv."].concat();
    let mut found = Vec::new();
    for file in crate_sources(&["contracts", "target"]) {
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

#[test]
fn no_string_errors_in_any_src() {
    assert_eq!(string_errors("fn a() -> Result<(), String> {}"), vec![1]);
    assert_eq!(
        string_errors("fn a() -> Result<Vec<String>, E> {}\nfn b() -> Result<\n  u8,\n  String,\n> {}"),
        vec![2]
    );
    assert!(string_errors("fn a() -> Result<(String, u8), Error> {} type X = MyResult<u8, String>;").is_empty());
    let mut found = Vec::new();
    for file in crate_sources(&["target"]) {
        let text = std::fs::read_to_string(&file).expect("readable");
        for line in string_errors(&text) {
            found.push(format!("{}:{line}", file.display()));
        }
    }
    assert!(found.is_empty(), "errors are typed (thiserror), not strings:\n{}", found.join("\n"));
}
