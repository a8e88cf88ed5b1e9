//! The configuration loader (what `causeway check` and every reload run) on arbitrary files: one
//! of causeway.yaml, a routes file or a policies file is replaced by the input, the rest is the
//! shipped configuration. Every outcome is a config or a list of diagnostics; nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A private copy of the shipped configuration, in memory-backed storage when there is some.
/// The shipped mediation policies and the routes naming them are left out: compiling ten schemas
/// and a jq program on every input would starve the fuzzer (inputs still bring their own).
fn workdir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
        let dir = base.join(format!("causeway-fuzz-config-{}", std::process::id()));
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        copy(&shipped.join("causeway.yaml"), &dir.join("causeway.yaml"));
        for sub in ["routes", "policies"] {
            copy_tree(&shipped.join(sub), &dir.join(sub));
        }
        std::fs::remove_file(dir.join("policies/mediation.yaml")).unwrap();
        std::fs::remove_file(dir.join("routes/erp-canonical.yaml")).unwrap();
        dir
    })
}

fn copy(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::copy(from, to).unwrap();
}

fn copy_tree(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_tree(&path, &target);
        } else {
            copy(&path, &target);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else { return };
    let dir = workdir();
    let target = match which % 3 {
        0 => {
            // Host names would be resolved through DNS: keep the main file on loopback.
            let text = String::from_utf8_lossy(rest);
            if text.match_indices("://").any(|(i, _)| !text[i + 3..].starts_with("127.0.0.1")) {
                return;
            }
            dir.join("causeway.yaml")
        }
        1 => dir.join("routes/fuzz.yaml"),
        _ => dir.join("policies/fuzz.yaml"),
    };
    let original = std::fs::read(&target).ok();
    std::fs::write(&target, rest).unwrap();
    let _ = causeway::config::load_with_env(dir, &|name| (name != "UNSET").then(|| "value".to_string()));
    match original {
        Some(bytes) => std::fs::write(&target, bytes).unwrap(),
        None => std::fs::remove_file(&target).unwrap(),
    }
});
