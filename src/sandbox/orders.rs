//! The sandbox's sales orders, in creation order, with the lookups Business Central answers from
//! its keys kept in indexes: by id or number, and by external document number (the gateway looks
//! an order up by it before every create). Scanning tens of thousands of orders per request made
//! the sandbox, not the gateway, the bottleneck of long benchmarks.

use serde_json::Value;
use std::collections::HashMap;

#[derive(Default)]
pub(super) struct Orders {
    all: Vec<Value>,
    /// id and number → position in `all`.
    by_key: HashMap<String, usize>,
    /// externalDocumentNumber (as a filter compares it) → positions in `all`, ascending.
    by_external: HashMap<String, Vec<usize>>,
}

/// A field's value as `$filter=field eq 'x'` compares it (`odata::value_matches`).
pub(super) fn filter_key(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

impl Orders {
    pub fn all(&self) -> &[Value] {
        &self.all
    }

    /// The position of the order whose id or number is `key`.
    pub fn position(&self, key: &str) -> Option<usize> {
        self.by_key.get(key).copied()
    }

    /// The position of the order whose id is `id`.
    pub fn position_by_id(&self, id: &str) -> Option<usize> {
        self.position(id).filter(|&p| self.all[p]["id"] == id)
    }

    pub fn get(&self, pos: usize) -> &Value {
        &self.all[pos]
    }

    /// The orders whose externalDocumentNumber is `external`, in creation order.
    pub fn with_external<'a>(&'a self, external: &str) -> impl Iterator<Item = &'a Value> {
        self.by_external.get(external).into_iter().flatten().map(|&p| &self.all[p])
    }

    pub fn push(&mut self, order: Value) {
        let pos = self.all.len();
        self.index(pos, &order);
        self.all.push(order);
    }

    /// Remove the order at `pos` (rare: invoicing, cancelling, DELETE), re-indexing the rest.
    pub fn remove(&mut self, pos: usize) -> Value {
        let order = self.all.remove(pos);
        self.by_key.clear();
        self.by_external.clear();
        for (p, o) in self.all.iter().enumerate() {
            Self::index_into(&mut self.by_key, &mut self.by_external, p, o);
        }
        order
    }

    /// Change the order at `pos`; its external document number's index follows (id and number
    /// are never written).
    pub fn modify<R>(&mut self, pos: usize, change: impl FnOnce(&mut Value) -> R) -> R {
        let before = self.all[pos].get("externalDocumentNumber").and_then(filter_key);
        let out = change(&mut self.all[pos]);
        let after = self.all[pos].get("externalDocumentNumber").and_then(filter_key);
        if before != after {
            if let Some(list) = before.and_then(|b| self.by_external.get_mut(&b)) {
                list.retain(|&p| p != pos);
            }
            if let Some(a) = after {
                let list = self.by_external.entry(a).or_default();
                let at = list.partition_point(|&p| p < pos);
                list.insert(at, pos);
            }
        }
        out
    }

    fn index(&mut self, pos: usize, order: &Value) {
        Self::index_into(&mut self.by_key, &mut self.by_external, pos, order);
    }

    fn index_into(
        by_key: &mut HashMap<String, usize>,
        by_external: &mut HashMap<String, Vec<usize>>,
        pos: usize,
        order: &Value,
    ) {
        for field in ["id", "number"] {
            if let Some(k) = order[field].as_str() {
                by_key.insert(k.to_string(), pos);
            }
        }
        if let Some(e) = order.get("externalDocumentNumber").and_then(filter_key) {
            by_external.entry(e).or_default().push(pos);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn order(n: u32, external: &str) -> Value {
        json!({ "id": format!("id-{n}"), "number": format!("S-{n}"), "externalDocumentNumber": external })
    }

    #[test]
    fn lookups_follow_pushes_changes_and_removals() {
        let mut orders = Orders::default();
        for n in 0..5 {
            orders.push(order(n, if n % 2 == 0 { "OPP-A" } else { "OPP-B" }));
        }
        let ids = |o: &Orders, e: &str| {
            o.with_external(e).map(|v| v["id"].as_str().unwrap().to_string()).collect::<Vec<_>>()
        };
        assert_eq!(ids(&orders, "OPP-A"), ["id-0", "id-2", "id-4"]);
        assert_eq!(orders.position("S-3"), Some(3));
        assert_eq!(orders.position_by_id("S-3"), None, "a number is not an id");
        orders.modify(4, |o| o["externalDocumentNumber"] = json!("OPP-B"));
        assert_eq!(ids(&orders, "OPP-B"), ["id-1", "id-3", "id-4"]);
        assert_eq!(ids(&orders, "OPP-A"), ["id-0", "id-2"]);
        let removed = orders.remove(1);
        assert_eq!(removed["id"], "id-1");
        assert_eq!(orders.position_by_id("id-4"), Some(3));
        assert_eq!(orders.position("id-1"), None);
        assert_eq!(ids(&orders, "OPP-B"), ["id-3", "id-4"]);
        assert_eq!(ids(&orders, "nobody"), Vec::<String>::new());
    }
}
