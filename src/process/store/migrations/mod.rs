//! The order store's schema, as versioned SQL files per backend (`sqlite/`, `postgres/`), and
//! the one runner that brings a store up to date: it reads the version the store records,
//! applies each newer file in order, each in one transaction with its version recorded, and
//! refuses a store whose schema is newer than this build knows (a rollback to an older binary
//! must not write to a schema it does not understand).

use super::StoreError;

/// One versioned schema change.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
}

/// SQLite's first schema, applied at every open: files of the first release carry no version.
pub const SQLITE_BASE: &str = include_str!("sqlite/0000_base.sql");

/// SQLite's changes after [`SQLITE_BASE`] (`PRAGMA user_version` records the last applied).
pub const SQLITE: &[Migration] = &[
    Migration {
        version: 1,
        name: "owners_and_leases",
        sql: include_str!("sqlite/0001_owners_and_leases.sql"),
    },
    Migration { version: 2, name: "outbox", sql: include_str!("sqlite/0002_outbox.sql") },
    Migration { version: 3, name: "lifecycle", sql: include_str!("sqlite/0003_lifecycle.sql") },
    Migration { version: 4, name: "traces", sql: include_str!("sqlite/0004_traces.sql") },
];

/// PostgreSQL's schema (the `causeway_migrations` table records what was applied).
pub const POSTGRES: &[Migration] = &[
    Migration { version: 1, name: "orders", sql: include_str!("postgres/0001_orders.sql") },
    Migration { version: 2, name: "outbox", sql: include_str!("postgres/0002_outbox.sql") },
    Migration { version: 3, name: "lifecycle", sql: include_str!("postgres/0003_lifecycle.sql") },
    Migration { version: 4, name: "traces", sql: include_str!("postgres/0004_traces.sql") },
];

/// Where a backend records its schema version, and how it applies one change.
#[async_trait::async_trait]
pub trait Schema: Send {
    /// The last version applied (0 for a new store).
    async fn version(&mut self) -> Result<i64, StoreError>;
    /// Apply `migration` and record its version, atomically.
    async fn apply(&mut self, migration: &Migration) -> Result<(), StoreError>;
}

/// Bring `schema` up to date with `migrations` (in version order, numbered from 1); returns the
/// version it stands at.
pub async fn run(schema: &mut dyn Schema, migrations: &[Migration]) -> Result<i64, StoreError> {
    let known = migrations.last().map_or(0, |m| m.version);
    let current = schema.version().await?;
    if current > known {
        return Err(StoreError(format!(
            "the order store's schema is at version {current}, newer than this build knows ({known}): \
             run the release that wrote it, or a newer one"
        )));
    }
    for migration in migrations.iter().filter(|m| m.version > current) {
        schema.apply(migration).await.map_err(|e| {
            StoreError(format!("schema migration {} ({}): {e}", migration.version, migration.name))
        })?;
    }
    Ok(known)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_count_from_one_without_gaps() {
        for set in [SQLITE, POSTGRES] {
            for (i, m) in set.iter().enumerate() {
                assert_eq!(m.version, i as i64 + 1, "{}", m.name);
                assert!(!m.sql.trim().is_empty(), "{}", m.name);
            }
        }
        assert_eq!(SQLITE.len(), POSTGRES.len(), "both backends hold the same schema");
    }

    /// A store that records what was applied.
    struct Recorder(i64, Vec<i64>);

    #[async_trait::async_trait]
    impl Schema for Recorder {
        async fn version(&mut self) -> Result<i64, StoreError> {
            Ok(self.0)
        }
        async fn apply(&mut self, m: &Migration) -> Result<(), StoreError> {
            self.1.push(m.version);
            self.0 = m.version;
            Ok(())
        }
    }

    #[tokio::test]
    async fn only_newer_changes_apply_in_order_and_a_newer_schema_is_refused() {
        let mut fresh = Recorder(0, Vec::new());
        assert_eq!(run(&mut fresh, SQLITE).await.unwrap(), 4);
        assert_eq!(fresh.1, [1, 2, 3, 4]);
        let mut halfway = Recorder(2, Vec::new());
        run(&mut halfway, SQLITE).await.unwrap();
        assert_eq!(halfway.1, [3, 4]);
        let mut newer = Recorder(9, Vec::new());
        let e = run(&mut newer, SQLITE).await.unwrap_err();
        assert!(e.0.contains("version 9, newer than this build knows (4)"), "{e}");
        assert!(newer.1.is_empty());
    }
}
