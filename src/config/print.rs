//! `causeway check --print`: the effective configuration, as the gateway reads it (environment
//! references expanded, every default filled in), with secrets masked: like `nginx -T`, for a
//! pipeline to show what will run.

use super::spec::{MainSpec, PoliciesFile, RoutesFile};
use super::{parse_file, yaml_files, Diagnostics, Env, MAIN_FILE};
use serde::{Serialize, Serializer};
use serde_saphyr::Spanned;
use std::fmt::Write;
use std::path::Path;

const MASK: &str = "********";

/// Every file of `dir` (causeway.yaml, routes/, policies/) as YAML documents, each headed by
/// its path; the configuration must be valid (check it first).
pub fn effective(dir: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<String, Diagnostics> {
    let env = Env::new(env, false);
    let mut diags = Diagnostics::default();
    let mut out = String::new();
    let mut document =
        |path: &Path, yaml: Result<String, serde_saphyr::ser::Error>, diags: &mut Diagnostics| match yaml {
            Ok(text) => {
                let _ = writeln!(out, "# {}\n---\n{}", path.display(), text.trim_end());
            }
            Err(e) => diags.file(path, format!("cannot print: {e}")),
        };
    let main_path = dir.join(MAIN_FILE);
    if let Some(main) = parse_file::<MainSpec>(&main_path, &env, &mut diags) {
        document(&main_path, serde_saphyr::to_string(&main), &mut diags);
    }
    for file in yaml_files(&dir.join("routes"), &mut diags) {
        if let Some(routes) = parse_file::<RoutesFile>(&file, &env, &mut diags) {
            document(&file, serde_saphyr::to_string(&routes), &mut diags);
        }
    }
    for file in yaml_files(&dir.join("policies"), &mut diags) {
        if let Some(policies) = parse_file::<PoliciesFile>(&file, &env, &mut diags) {
            document(&file, serde_saphyr::to_string(&policies), &mut diags);
        }
    }
    if diags.0.is_empty() {
        Ok(out)
    } else {
        Err(diags)
    }
}

/// A secret: never printed.
pub fn mask<T, S: Serializer>(_: &T, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(MASK)
}

pub fn mask_option<T, S: Serializer>(value: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(_) => s.serialize_some(MASK),
        None => s.serialize_none(),
    }
}

/// A connection URL with its password masked (`postgres://user:********@host/db`).
pub fn mask_url_password<S: Serializer>(url: &Spanned<String>, s: S) -> Result<S::Ok, S::Error> {
    masked_url(&url.value).serialize(s)
}

pub fn mask_url_password_option<S: Serializer>(
    url: &Option<Spanned<String>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    url.as_ref().map(|u| masked_url(&u.value)).serialize(s)
}

fn masked_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else { return url.to_string() };
    let user = rest[..at].split(':').next().unwrap_or("");
    format!("{scheme}://{user}:{MASK}@{}", &rest[at + 1..])
}

#[cfg(test)]
mod tests {
    use super::masked_url;

    #[test]
    fn url_passwords_are_masked() {
        assert_eq!(masked_url("postgres://app:s3cr:et@db:5432/x"), "postgres://app:********@db:5432/x");
        assert_eq!(masked_url("redis://:pw@cache:6379/0"), "redis://:********@cache:6379/0");
        assert_eq!(masked_url("redis://cache:6379/0"), "redis://cache:6379/0");
    }
}
