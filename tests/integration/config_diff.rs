//! `causeway diff OLD NEW` on the shipped configuration and a scripted edit of it: exactly the
//! changes made are listed, and nothing when nothing changed.

use crate::common::config::Patch;
use crate::common::*;
use std::path::Path;
use std::process::Command;

fn copy_shipped(to: &Path) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::create_dir_all(to).unwrap();
    std::fs::copy(root.join("causeway.yaml"), to.join("causeway.yaml")).unwrap();
    for dir in ["routes", "policies"] {
        copy_tree(&root.join(dir), &to.join(dir));
    }
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn edit(file: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(file).unwrap();
    std::fs::write(file, text.patched(from, to)).unwrap();
}

fn diff(old: &Path, new: &Path) -> (i32, String, String) {
    let out = Command::new(binary()).arg("diff").arg(old).arg(new).output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).to_string();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

#[test]
fn diff_lists_exactly_the_changes_of_a_scripted_edit() {
    let work = tempfile::tempdir().unwrap();
    let (old, new) = (work.path().join("old"), work.path().join("new"));
    copy_shipped(&old);
    copy_shipped(&new);
    let (code, out, _) = diff(&old, &new);
    assert_eq!((code, out.as_str()), (0, "no changes\n"), "identical directories");

    // The scripted edit: a route's deadline, a quota tier, the ERP budget, a removed policy, an
    // added route file, a setting, and a comment (which is no change).
    edit(&new.join("routes/erp-canonical.yaml"), "      total_ms: 60000", "      total_ms: 45000");
    edit(&new.join("policies/partners.yaml"), "partner: { requests: 60,", "partner: { requests: 30,");
    edit(
        &new.join("causeway.yaml"),
        "window_requests: 6000    # per sliding window\n",
        "window_requests: 3000    # per sliding window\n",
    );
    edit(&new.join("causeway.yaml"), "upstream_pool_size: 128", "upstream_pool_size: 64");
    edit(&new.join("causeway.yaml"), "# One budget for everything", "# One shared budget for everything");
    let headers = std::fs::read_to_string(new.join("policies/headers.yaml")).unwrap();
    assert!(headers.contains("- name: erp-api-headers"), "{headers}");
    std::fs::write(
        new.join("routes/extra.yaml"),
        "routes:\n  - name: items-v3\n    match: { methods: [GET], path: /erp/v3/items }\n    upstream: bc\n    policies: [erp-keys]\n    scopes: [erp.read]\n    version: v3\n",
    )
    .unwrap();
    let (code, out, err) = diff(&old, &new);
    assert_eq!(code, 1, "{out}{err}");
    let mut lines: Vec<&str> = out.lines().collect();
    let summary = lines.pop().unwrap();
    assert_eq!(
        lines,
        [
            "~ route canonical-sales-order-create (routes/erp-canonical.yaml)",
            "    /timeouts/total_ms: 60000 -> 45000",
            "+ route items-v3 (routes/extra.yaml)",
            "~ policy partner-quota (policies/partners.yaml)",
            "    /tiers/partner/requests: 60 -> 30",
            "~ upstream bc (causeway.yaml)",
            "    /budget/window_requests: 6000 -> 3000",
            "~ setting upstream_pool_size (causeway.yaml)",
            "    /: 128 -> 64",
        ],
        "{out}"
    );
    assert_eq!(summary, "5 change(s): 1 added, 0 removed, 4 changed");

    // Removing a policy file and a route shows them as removed, from the file they were in.
    std::fs::remove_file(new.join("routes/extra.yaml")).unwrap();
    std::fs::remove_file(new.join("policies/partners.yaml")).unwrap();
    let (_, out, _) = diff(&old, &new);
    assert!(out.contains("- policy partner-keys (was in policies/partners.yaml)\n"), "{out}");
    assert!(out.contains("- policy partner-quota (was in policies/partners.yaml)\n"), "{out}");
    assert!(!out.contains("items-v3"), "{out}");
}

#[test]
fn diff_refuses_what_is_not_a_configuration_with_file_and_line() {
    let work = tempfile::tempdir().unwrap();
    let (old, new) = (work.path().join("old"), work.path().join("new"));
    copy_shipped(&old);
    copy_shipped(&new);
    let (code, _, err) = diff(&old, &work.path().join("missing"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not a configuration directory"), "{err}");
    edit(&new.join("routes/erp-canonical.yaml"), "      total_ms: 60000", "      total_ms: [60000");
    let (code, out, err) = diff(&old, &new);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("routes/erp-canonical.yaml:"), "file and line: {err}");
    // Hostile names survive as text: a route named with odd Unicode is listed as written.
    let odd =
        "routes:\n  - name: \"r\u{202e}v1\"\n    match: { path: /x }\n    upstream: bc\n    public: true\n";
    edit(&new.join("routes/erp-canonical.yaml"), "      total_ms: [60000", "      total_ms: 60000");
    std::fs::write(new.join("routes/odd.yaml"), odd).unwrap();
    let (code, out, _) = diff(&old, &new);
    assert_eq!(code, 1);
    assert!(out.contains("+ route r\u{202e}v1 (routes/odd.yaml)"), "{out}");
    // A duplicate name would hide one definition: refused, naming both files.
    std::fs::write(new.join("routes/odd2.yaml"), odd).unwrap();
    let (code, _, err) = diff(&old, &new);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("odd2.yaml") && err.contains("defined twice (also in routes/odd.yaml)"), "{err}");
}
