//! Route templates, shared by the configuration (which compiles them) and the proxy (which
//! matches requests with them): a `match.path` template with `{param}` and a final `{*rest}`, and
//! the `rewrite` template that builds the upstream path from what it captured.

/// One segment of a path template.
#[derive(Debug, Clone, PartialEq)]
enum Segment {
    Literal(String),
    /// `prefix{name}suffix` within one segment.
    Param {
        prefix: String,
        suffix: String,
    },
    /// `{*name}`: the rest of the path, possibly empty; only last.
    Rest,
}

/// A parsed `match.path` template. Captures are numbered in order of appearance.
#[derive(Debug, Clone)]
pub struct PathTemplate {
    segments: Vec<Segment>,
    names: Vec<String>,
    literal_segments: usize,
}

impl PathTemplate {
    pub fn parse(template: &str) -> Result<Self, String> {
        let Some(body) = template.strip_prefix('/') else {
            return Err(format!("path template `{template}` must start with `/`"));
        };
        let mut segments = Vec::new();
        let mut names: Vec<String> = Vec::new();
        let raw: Vec<&str> = if body.is_empty() { Vec::new() } else { body.split('/').collect() };
        for (i, seg) in raw.iter().enumerate() {
            let open = seg.find('{');
            let Some(open) = open else {
                if seg.contains('}') {
                    return Err(format!("unbalanced `}}` in segment `{seg}`"));
                }
                segments.push(Segment::Literal((*seg).to_string()));
                continue;
            };
            let close = seg
                .rfind('}')
                .filter(|c| *c > open)
                .ok_or_else(|| format!("unbalanced `{{` in segment `{seg}`"))?;
            let name = &seg[open + 1..close];
            let (prefix, suffix) = (&seg[..open], &seg[close + 1..]);
            if prefix.contains(['{', '}']) || suffix.contains(['{', '}']) {
                return Err(format!("only one parameter per segment is allowed: `{seg}`"));
            }
            if let Some(rest) = name.strip_prefix('*') {
                if i != raw.len() - 1 || !prefix.is_empty() || !suffix.is_empty() {
                    return Err(format!("`{{*{rest}}}` must be the whole last segment of the template"));
                }
                check_name(rest)?;
                names.push(rest.to_string());
                segments.push(Segment::Rest);
            } else {
                check_name(name)?;
                names.push(name.to_string());
                segments.push(Segment::Param { prefix: prefix.into(), suffix: suffix.into() });
            }
        }
        for (i, n) in names.iter().enumerate() {
            if names[..i].contains(n) {
                return Err(format!("parameter `{n}` appears twice"));
            }
        }
        let literal_segments = segments.iter().filter(|s| matches!(s, Segment::Literal(_))).count();
        Ok(PathTemplate { segments, names, literal_segments })
    }

    pub fn param_names(&self) -> &[String] {
        &self.names
    }

    /// How specific the template is: more literal segments win, a trailing rest loses.
    pub fn specificity(&self) -> (usize, usize, bool) {
        let has_rest = matches!(self.segments.last(), Some(Segment::Rest));
        (self.literal_segments, self.segments.len(), !has_rest)
    }

    /// Match a request path (no query). Returns the captured values in template order.
    pub fn matches<'p>(&self, path: &'p str) -> Option<Vec<&'p str>> {
        let body = path.strip_prefix('/')?;
        let mut captures = Vec::with_capacity(self.names.len());
        let mut rest = body;
        for (i, seg) in self.segments.iter().enumerate() {
            if let Segment::Rest = seg {
                captures.push(rest);
                return Some(captures);
            }
            let (current, remaining, had_slash) = match rest.find('/') {
                Some(p) => (&rest[..p], &rest[p + 1..], true),
                None => (rest, "", false),
            };
            match seg {
                Segment::Literal(l) if l == current => {}
                Segment::Param { prefix, suffix } => {
                    let inner = current.strip_prefix(prefix.as_str())?.strip_suffix(suffix.as_str())?;
                    if inner.is_empty() {
                        return None;
                    }
                    captures.push(inner);
                }
                _ => return None,
            }
            if i + 1 == self.segments.len() {
                // Trailing slash tolerated, nothing else.
                return (remaining.is_empty()).then_some(captures);
            }
            if !had_slash {
                // More template segments but the path ended: only a trailing rest can match.
                return match self.segments.get(i + 1) {
                    Some(Segment::Rest) if i + 2 == self.segments.len() => {
                        captures.push("");
                        Some(captures)
                    }
                    _ => None,
                };
            }
            rest = remaining;
        }
        (body.is_empty() && self.segments.is_empty()).then_some(captures)
    }
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!("parameter name `{name}` must be letters, digits or `_`"));
    }
    Ok(())
}

/// The upstream path: literal text and references to captured parameters.
#[derive(Debug, Clone)]
pub struct RewriteTemplate {
    parts: Vec<RewritePart>,
}

#[derive(Debug, Clone)]
enum RewritePart {
    Literal(String),
    Param(usize),
}

impl RewriteTemplate {
    /// Compile against the names the match template captures.
    pub fn parse(template: &str, names: &[String]) -> Result<Self, String> {
        if !template.starts_with('/') {
            return Err(format!("rewrite `{template}` must start with `/`"));
        }
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(RewritePart::Literal(rest[..open].to_string()));
            }
            let close = rest[open..]
                .find('}')
                .map(|c| c + open)
                .ok_or_else(|| format!("unbalanced `{{` in rewrite `{template}`"))?;
            let name = &rest[open + 1..close];
            let idx = names.iter().position(|n| n == name).ok_or_else(|| {
                format!("rewrite uses `{{{name}}}` but the path template captures no such parameter")
            })?;
            parts.push(RewritePart::Param(idx));
            rest = &rest[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(RewritePart::Literal(rest.to_string()));
        }
        Ok(RewriteTemplate { parts })
    }

    pub fn render(&self, captures: &[&str], query: Option<&str>) -> String {
        let mut out = String::with_capacity(64);
        for part in &self.parts {
            match part {
                RewritePart::Literal(l) => out.push_str(l),
                RewritePart::Param(i) => out.push_str(captures.get(*i).copied().unwrap_or("")),
            }
        }
        if let Some(q) = query {
            out.push('?');
            out.push_str(q);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m<'a>(t: &str, p: &'a str) -> Option<Vec<&'a str>> {
        PathTemplate::parse(t).unwrap().matches(p)
    }

    #[test]
    fn literal_and_params() {
        assert_eq!(m("/erp/v2/customers", "/erp/v2/customers"), Some(vec![]));
        assert_eq!(m("/erp/v2/customers", "/erp/v2/customers/"), Some(vec![]));
        assert_eq!(m("/erp/v2/customers", "/erp/v2/customer"), None);
        assert_eq!(m("/erp/v2/customers", "/erp/v2/customers/x"), None);
        assert_eq!(m("/c/{id}", "/c/42"), Some(vec!["42"]));
        assert_eq!(m("/c/{id}", "/c/"), None);
        assert_eq!(m("/items({id})", "/items(abc)"), Some(vec!["abc"]));
        assert_eq!(m("/items({id})", "/items()"), None);
        assert_eq!(m("/items({id})", "/itemsabc"), None);
    }

    #[test]
    fn rest_captures_remainder() {
        assert_eq!(m("/erp/{*rest}", "/erp/a/b/c"), Some(vec!["a/b/c"]));
        assert_eq!(m("/erp/{*rest}", "/erp/"), Some(vec![""]));
        assert_eq!(m("/erp/{*rest}", "/erp"), Some(vec![""]));
        assert_eq!(m("/erp/{*rest}", "/erpx"), None);
        assert_eq!(m("/{*all}", "/"), Some(vec![""]));
    }

    #[test]
    fn template_errors() {
        assert!(PathTemplate::parse("no-slash").is_err());
        assert!(PathTemplate::parse("/{*rest}/x").is_err());
        assert!(PathTemplate::parse("/{a}/{a}").is_err());
        assert!(PathTemplate::parse("/{a").is_err());
        assert!(PathTemplate::parse("/{a-b}").is_err());
    }

    #[test]
    fn rewrite_renders_params_and_query() {
        let t = PathTemplate::parse("/erp/v2/{entity}/{*rest}").unwrap();
        let rw = RewriteTemplate::parse("/api/v2.0/companies(1)/{entity}/{rest}", t.param_names()).unwrap();
        let caps = t.matches("/erp/v2/items/x/y").unwrap();
        assert_eq!(rw.render(&caps, Some("$top=1")), "/api/v2.0/companies(1)/items/x/y?$top=1");
        assert!(RewriteTemplate::parse("/x/{nope}", t.param_names()).is_err());
    }

    #[test]
    fn specificity_orders_literals_first() {
        let a = PathTemplate::parse("/erp/v2/{*rest}").unwrap();
        let b = PathTemplate::parse("/erp/v2/companies").unwrap();
        assert!(b.specificity() > a.specificity());
    }
}
