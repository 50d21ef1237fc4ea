//! CloudStack's own state spellings (`com.cloud.storage.Volume.State`, `com.cloud.vm.VirtualMachine.State`) as
//! enums. CloudStack adds states across versions, so each has an [`Other`](CloudVolumeState::Other) variant that
//! keeps a spelling this version does not know: an unexpected state never fails a response, and it is shown as
//! CloudStack sent it. The JSON form is the plain string either way.

use serde::{Deserialize, Serialize};
use utoipa::openapi::schema::{AnyOfBuilder, ObjectBuilder, SchemaType};
use utoipa::openapi::{RefOr, Schema};

/// A CloudStack state: the known spellings as variants, anything else kept as text.
macro_rules! cloud_state {
    ($(#[$m:meta])* pub enum $name:ident { $($(#[$vm:meta])* $v:ident = $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(from = "String", into = "String")]
        pub enum $name {
            $($(#[$vm])* $v,)+
            /// A state this version does not know, as CloudStack spelled it.
            Other(String),
        }

        impl $name {
            /// The spellings this version knows, in declaration order.
            pub const KNOWN: &'static [&'static str] = &[$($s),+];

            /// CloudStack's spelling.
            pub fn as_str(&self) -> &str {
                match self {
                    $(Self::$v => $s,)+
                    Self::Other(s) => s,
                }
            }

            /// Whether CloudStack sent a spelling this version does not know.
            pub fn is_other(&self) -> bool {
                matches!(self, Self::Other(_))
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                match s {
                    $($s => Self::$v,)+
                    other => Self::Other(other.to_string()),
                }
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                match Self::from(s.as_str()) {
                    Self::Other(_) => Self::Other(s),
                    known => known,
                }
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                match v {
                    $name::Other(s) => s,
                    known => known.as_str().to_string(),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl<'s> utoipa::ToSchema<'s> for $name {
            fn schema() -> (&'s str, RefOr<Schema>) {
                (stringify!($name), state_schema(Self::KNOWN))
            }
        }
    };
}

/// One of the known spellings, or any other text (a state of a newer CloudStack).
fn state_schema(known: &[&str]) -> RefOr<Schema> {
    AnyOfBuilder::new()
        .item(
            ObjectBuilder::new()
                .schema_type(SchemaType::String)
                .enum_values(Some(known.iter().copied())),
        )
        .item(
            ObjectBuilder::new()
                .schema_type(SchemaType::String)
                .description(Some("a state of a newer CloudStack, as it spells it")),
        )
        .description(Some("CloudStack's own spelling of the state"))
        .into()
}

cloud_state! {
    /// The state of a volume as CloudStack reports it (`com.cloud.storage.Volume.State`). Attachment is not a
    /// state: it shows in `virtualmachineid`/`deviceid`.
    pub enum CloudVolumeState {
        /// Created without storage; gets storage at its first attach to a running VM.
        Allocated = "Allocated",
        Creating = "Creating",
        /// Has storage and can be used.
        Ready = "Ready",
        Resizing = "Resizing",
        Migrating = "Migrating",
        Copying = "Copying",
        Snapshotting = "Snapshotting",
        RevertSnapshotting = "RevertSnapshotting",
        Attaching = "Attaching",
        Destroy = "Destroy",
        Destroying = "Destroying",
        Expunging = "Expunging",
        Expunged = "Expunged",
        UploadOp = "UploadOp",
        Uploaded = "Uploaded",
        NotUploaded = "NotUploaded",
        UploadInProgress = "UploadInProgress",
        UploadError = "UploadError",
        UploadAbandoned = "UploadAbandoned",
        Restoring = "Restoring",
        RestoreError = "RestoreError",
    }
}

cloud_state! {
    /// The state of a VM as CloudStack reports it (`com.cloud.vm.VirtualMachine.State`). `Unknown` is CloudStack's
    /// own state (the host cannot tell); a spelling this version does not know is `Other`.
    pub enum CloudVmState {
        Starting = "Starting",
        Running = "Running",
        Stopping = "Stopping",
        Stopped = "Stopped",
        Migrating = "Migrating",
        Error = "Error",
        Unknown = "Unknown",
        Shutdown = "Shutdown",
        Destroyed = "Destroyed",
        Expunging = "Expunging",
        Restoring = "Restoring",
        BackingUp = "BackingUp",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn known_spellings_round_trip_and_unknown_ones_are_kept() {
        for s in CloudVolumeState::KNOWN {
            let v: CloudVolumeState = serde_json::from_value(json!(s)).unwrap();
            assert!(!v.is_other(), "{s}");
            assert_eq!(serde_json::to_value(&v).unwrap(), json!(s));
        }
        for s in CloudVmState::KNOWN {
            let v: CloudVmState = serde_json::from_value(json!(s)).unwrap();
            assert!(!v.is_other(), "{s}");
            assert_eq!(v.to_string(), *s);
        }
        assert_eq!(CloudVolumeState::from("Ready"), CloudVolumeState::Ready);
        assert_eq!(CloudVmState::from("Running"), CloudVmState::Running);
        let future: CloudVolumeState = serde_json::from_value(json!("Hibernating")).unwrap();
        assert_eq!(future, CloudVolumeState::Other("Hibernating".into()));
        assert_eq!(serde_json::to_value(&future).unwrap(), json!("Hibernating"));
        // Spellings are CloudStack's exactly; another case is not guessed at.
        assert!(CloudVmState::from("running").is_other());
    }

    #[test]
    fn the_schema_lists_the_known_spellings_and_admits_others() {
        let (name, schema) = <CloudVmState as utoipa::ToSchema>::schema();
        assert_eq!(name, "CloudVmState");
        let v = serde_json::to_value(schema).unwrap();
        assert_eq!(v["anyOf"][0]["enum"][1], "Running", "{v}");
        assert_eq!(v["anyOf"][1]["type"], "string", "{v}");
    }
}
