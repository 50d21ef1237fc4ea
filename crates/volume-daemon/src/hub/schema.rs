//! The check of the hub's tables: each table and column the projection reads or writes must exist with a
//! compatible type. The daemon never creates, alters or drops them; it reports what is missing or differs.

use std::collections::BTreeMap;

use sqlx::Row;

use super::{q, within, Hub, HubError};

/// The kind of column a projection column needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Text,
    Int,
    Time,
}

impl Family {
    fn admits(self, data_type: &str) -> bool {
        let t = data_type.to_ascii_lowercase();
        match self {
            Self::Text => matches!(
                t.as_str(),
                "char" | "varchar" | "text" | "tinytext" | "mediumtext" | "longtext" | "enum"
            ),
            Self::Int => matches!(
                t.as_str(),
                "tinyint" | "smallint" | "mediumint" | "int" | "integer" | "bigint"
            ),
            Self::Time => matches!(t.as_str(), "timestamp" | "datetime"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Text => "a text type",
            Self::Int => "an integer type",
            Self::Time => "timestamp or datetime",
        }
    }
}

use Family::{Int, Text, Time};

/// Every column the daemon uses, by table. `ossea_configs` is read only (the `hub` identity source).
const REQUIRED: &[(&str, &[(&str, Family)])] = &[
    (
        "device_mappings",
        &[
            ("volume_uuid", Text),
            ("vm_id", Text),
            ("operation_mode", Text),
            ("cloudstack_device_id", Int),
            ("device_path", Text),
            ("cloudstack_state", Text),
            ("linux_state", Text),
            ("size", Int),
            ("persistent_device_name", Text),
            ("symlink_path", Text),
            ("vm_context_id", Text),
            ("last_sync", Time),
            ("created_at", Time),
            ("updated_at", Time),
        ],
    ),
    (
        "nbd_exports",
        &[
            ("vm_context_id", Text),
            ("volume_id", Text),
            ("device_mapping_uuid", Text),
            ("export_name", Text),
            ("port", Int),
            ("device_path", Text),
            ("config_path", Text),
            ("status", Text),
            ("created_at", Time),
            ("updated_at", Time),
        ],
    ),
    (
        "ossea_volumes",
        &[
            ("volume_id", Text),
            ("device_path", Text),
            ("status", Text),
            ("updated_at", Time),
        ],
    ),
    ("ossea_configs", &[("oma_vm_id", Text), ("is_active", Int)]),
];

/// What the check found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SchemaReport {
    /// Each missing table or column, or column of the wrong type, as a sentence.
    pub problems: Vec<String>,
    /// Whether `ossea_volumes.vm_context_id` exists (the context of new mappings and exports is read from it).
    pub has_volume_context: bool,
}

impl SchemaReport {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

impl Hub {
    /// Reads the hub's columns from `information_schema` and compares them with what the projection uses.
    pub async fn check_schema(&self) -> Result<SchemaReport, HubError> {
        within(
            "reading the hub's table definitions",
            self.check_schema_now(),
        )
        .await
    }

    async fn check_schema_now(&self) -> Result<SchemaReport, HubError> {
        let rows = sqlx::query(
            "SELECT CAST(TABLE_NAME AS CHAR) AS t, CAST(COLUMN_NAME AS CHAR) AS c, \
             CAST(DATA_TYPE AS CHAR) AS d FROM information_schema.COLUMNS \
             WHERE TABLE_SCHEMA = DATABASE() \
             AND TABLE_NAME IN ('device_mappings', 'nbd_exports', 'ossea_volumes', 'ossea_configs')",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(q("reading the hub's table definitions"))?;
        let mut found: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        for r in &rows {
            let t: String = r
                .try_get("t")
                .map_err(q("reading the hub's table definitions"))?;
            let c: String = r
                .try_get("c")
                .map_err(q("reading the hub's table definitions"))?;
            let d: String = r
                .try_get("d")
                .map_err(q("reading the hub's table definitions"))?;
            found
                .entry(t.to_ascii_lowercase())
                .or_default()
                .insert(c.to_ascii_lowercase(), d);
        }
        Ok(compare(&found))
    }
}

/// Compares the hub's columns (table → column → data type) with [`REQUIRED`].
fn compare(found: &BTreeMap<String, BTreeMap<String, String>>) -> SchemaReport {
    let mut problems = Vec::new();
    for (table, columns) in REQUIRED {
        let Some(have) = found.get(*table) else {
            problems.push(format!("table {table} is missing"));
            continue;
        };
        for (col, family) in *columns {
            match have.get(*col) {
                None => problems.push(format!("column {table}.{col} is missing")),
                Some(t) if !family.admits(t) => problems.push(format!(
                    "column {table}.{col} is {t}, expected {}",
                    family.name()
                )),
                Some(_) => {}
            }
        }
    }
    SchemaReport {
        problems,
        has_volume_context: found
            .get("ossea_volumes")
            .is_some_and(|c| c.contains_key("vm_context_id")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> BTreeMap<String, BTreeMap<String, String>> {
        let mut m = BTreeMap::new();
        for (table, columns) in REQUIRED {
            let cols = columns
                .iter()
                .map(|(c, f)| {
                    let t = match f {
                        Text => "varchar",
                        Int => "bigint",
                        Time => "datetime",
                    };
                    (c.to_string(), t.to_string())
                })
                .collect();
            m.insert(table.to_string(), cols);
        }
        m
    }

    #[test]
    fn a_complete_hub_passes_and_each_gap_is_named() {
        let ok = compare(&full());
        assert!(ok.is_ok(), "{:?}", ok.problems);
        assert!(!ok.has_volume_context);

        let mut m = full();
        m.remove("nbd_exports");
        m.get_mut("device_mappings").unwrap().remove("device_path");
        m.get_mut("ossea_volumes")
            .unwrap()
            .insert("status".into(), "int".into());
        let r = compare(&m);
        assert_eq!(
            r.problems,
            vec![
                "column device_mappings.device_path is missing".to_string(),
                "table nbd_exports is missing".to_string(),
                "column ossea_volumes.status is int, expected a text type".to_string(),
            ]
        );
    }
}
