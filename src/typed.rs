//! Typed events: an application declares its event types once — type name,
//! current version, payload type — as an enum implementing [`Event`], and
//! appends and decodes them without strings scattered through the code:
//! [`NewEvent::typed`](crate::NewEvent::typed) builds an append,
//! [`StoredEvent::typed`](crate::StoredEvent::typed) decodes a read event
//! into the enum, and [`Registry::events`](crate::Registry::events)
//! registers the types with the store (validation at append, upcasting on
//! read).
//!
//! The [`events!`](crate::events) macro writes the enum and its impl from
//! one line per variant; implementing [`Event`] by hand is as easy.

/// An event type an [`Event`] enum covers: its name (the `event_type`
/// column) and its current version (the `event_version` column).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EventType {
    /// The type name, e.g. `MoneyDeposited`.
    pub name: &'static str,
    /// The current schema version of its payload (1, 2, …).
    pub version: i32,
}

impl EventType {
    /// The type `name` at its current `version`.
    pub const fn new(name: &'static str, version: i32) -> EventType {
        EventType { name, version }
    }
}

/// An application's event types, usually an enum with one variant per type
/// holding the payload: written with the [`events!`](crate::events) macro,
/// or by hand:
///
/// ```
/// use projectionist::{Event, EventType};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct Deposited { cents: i64 }
///
/// enum Bank { Deposited(Deposited) }
///
/// impl Event for Bank {
///     fn types() -> &'static [EventType] {
///         const TYPES: &[EventType] = &[EventType::new("MoneyDeposited", 2)];
///         TYPES
///     }
///     fn event_type(&self) -> &'static str { "MoneyDeposited" }
///     fn to_payload(&self) -> serde_json::Result<String> {
///         match self { Bank::Deposited(p) => serde_json::to_string(p) }
///     }
///     fn from_payload(event_type: &str, payload: &str) -> Option<serde_json::Result<Self>> {
///         match event_type {
///             "MoneyDeposited" => Some(serde_json::from_str(payload).map(Bank::Deposited)),
///             _ => None,
///         }
///     }
/// }
/// ```
pub trait Event: Sized {
    /// Every event type this enum covers, each with its current version.
    fn types() -> &'static [EventType];

    /// This value's type name (one of [`Event::types`]).
    fn event_type(&self) -> &'static str;

    /// This value's version: the current version of its type, from
    /// [`Event::types`] (0 when the type is missing there, which an append
    /// through a store with a registry refuses).
    fn event_version(&self) -> i32 {
        let name = self.event_type();
        Self::types()
            .iter()
            .find(|t| t.name == name)
            .map_or(0, |t| t.version)
    }

    /// The payload as JSON text (without the type name).
    fn to_payload(&self) -> serde_json::Result<String>;

    /// Decodes the payload of an `event_type` event at its current version;
    /// `None` when this enum does not cover `event_type`.
    fn from_payload(event_type: &str, payload: &str) -> Option<serde_json::Result<Self>>;
}

/// Declares an event enum — one variant per event type, each holding its
/// payload type — and implements [`Event`] for it.
///
/// ```
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// pub struct MoneyDeposited { pub cents: i64, pub currency: String }
/// #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// pub struct AccountOpened { pub owner: String }
///
/// projectionist::events! {
///     /// Everything that happens to an account.
///     #[derive(Clone, Debug, PartialEq)]
///     pub enum BankEvent {
///         /// The first event of an account.
///         Opened(AccountOpened) = ("AccountOpened", 1),
///         /// Money came in (version 2: cents and currency).
///         Deposited(MoneyDeposited) = ("MoneyDeposited", 2),
///     }
/// }
///
/// let e = projectionist::NewEvent::typed(&BankEvent::Deposited(MoneyDeposited {
///     cents: 500,
///     currency: "EUR".into(),
/// }))
/// .unwrap();
/// assert_eq!(e.event_type(), "MoneyDeposited");
/// assert_eq!(e.event_version(), 2);
/// ```
///
/// The payload types need `Serialize` and `Deserialize`; the enum itself
/// needs neither.
#[macro_export]
macro_rules! events {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $(
                $(#[$vmeta:meta])*
                $variant:ident($payload:ty) = ($type_name:literal, $version:literal)
            ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        $vis enum $name {
            $(
                $(#[$vmeta])*
                $variant($payload),
            )+
        }

        impl $crate::Event for $name {
            fn types() -> &'static [$crate::EventType] {
                const TYPES: &[$crate::EventType] =
                    &[$($crate::EventType::new($type_name, $version),)+];
                TYPES
            }

            fn event_type(&self) -> &'static str {
                match self {
                    $($name::$variant(_) => $type_name,)+
                }
            }

            fn event_version(&self) -> i32 {
                match self {
                    $($name::$variant(_) => $version,)+
                }
            }

            fn to_payload(&self) -> $crate::__private::serde_json::Result<::std::string::String> {
                match self {
                    $($name::$variant(p) => $crate::__private::serde_json::to_string(p),)+
                }
            }

            fn from_payload(
                event_type: &str,
                payload: &str,
            ) -> ::std::option::Option<$crate::__private::serde_json::Result<Self>> {
                match event_type {
                    $($type_name => ::std::option::Option::Some(
                        $crate::__private::serde_json::from_str::<$payload>(payload).map($name::$variant),
                    ),)+
                    _ => ::std::option::Option::None,
                }
            }
        }
    };
}
