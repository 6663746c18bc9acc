//! The [`Registry`]: an application's event types (name and current
//! version) and the upcasters that bring older shapes — older versions,
//! older type names — to the current one.
//!
//! A store carries at most one registry ([`StoreConfig::registry`]); every
//! read through the store upcasts with it (projections in every mode,
//! stream reads, `read_all`, `dlq show` and `dlq retry`), so handlers only
//! ever see current shapes, and every append through it is validated.
//!
//! [`StoreConfig::registry`]: crate::StoreConfig::registry

use crate::error::{Error, Kind, Result};
use crate::event::{NewEvent, StoredEvent};
use crate::typed::Event;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

/// What an upcaster returns: the payload in the next shape, or why the old
/// payload cannot be converted (any error type; `"text".into()` works).
pub type UpcastResult = std::result::Result<Value, Box<dyn std::error::Error + Send + Sync>>;

type Transform = Arc<dyn Fn(Value) -> UpcastResult + Send + Sync>;
type Validator = Arc<dyn Fn(&str, &str) -> std::result::Result<(), String> + Send + Sync>;

/// One registered step: `(type, version)` to `(to_type, to_version)`.
#[derive(Clone)]
struct Step {
    to_type: Arc<str>,
    to_version: i32,
    /// `None`: a rename, the payload is unchanged.
    transform: Option<Transform>,
}

/// Everything the registry knows about one type name.
#[derive(Clone, Default)]
struct Name {
    /// The current version, when the name is a registered (current) type.
    current: Option<i32>,
    /// Checks a payload of the current version (at append).
    validator: Option<Validator>,
    /// Upcasters from older versions (or from this name to another one).
    steps: HashMap<i32, Step>,
}

/// Why an event is not one the registry knows (see
/// [`UnknownEvents`](crate::UnknownEvents)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Unknown {
    /// A registered type at a version above the current one: written by a
    /// newer release.
    NewerVersion { current: i32 },
    /// A registered type at an older version with no upcaster from it.
    NoUpcaster { current: i32 },
    /// A type the registry does not register.
    UnregisteredType,
}

impl Unknown {
    /// The operator's message: what the event is, where, and what to do.
    pub(crate) fn describe(&self, event: &StoredEvent, projection: &str) -> String {
        let what = format!(
            "event {} version {} at global position {} ({} {} v{})",
            event.event_type,
            event.event_version,
            event.global_position,
            event.aggregate_type,
            event.aggregate_id,
            event.aggregate_version
        );
        match self {
            Unknown::NewerVersion { current } => format!(
                "{what} is newer than this binary knows (its registry has {} up to version {current}): it was \
                 written by a newer release. Nothing after it is handled; deploy the newer binary (its registry \
                 knows version {}), then run `resume {projection}`",
                event.event_type, event.event_version
            ),
            Unknown::NoUpcaster { current } => format!(
                "{what} is older than the current version {current} and the registry has no upcaster from \
                 {} version {}: register one (Registry::upcaster), deploy, then run `resume {projection}`",
                event.event_type, event.event_version
            ),
            Unknown::UnregisteredType => format!(
                "{what} has a type this binary's registry does not know, and the projection handles only \
                 registered types: it was probably written by a newer release. Nothing after it is handled; \
                 deploy the newer binary (or register the type), then run `resume {projection}`"
            ),
        }
    }
}

/// An application's event types and upcasters. Build it once at start-up,
/// hand it to the store with [`StoreConfig::registry`], which checks it.
///
/// ```
/// use projectionist::Registry;
/// use serde_json::json;
///
/// let registry = Registry::new()
///     .event_type::<serde_json::Value>("MoneyDeposited", 2)
///     // version 1 {"amount": N} → version 2 {"cents": N, "currency": "EUR"}
///     .upcaster("MoneyDeposited", 1, |v1| {
///         let amount = v1.get("amount").cloned().ok_or("no amount")?;
///         Ok(json!({ "cents": amount, "currency": "EUR" }))
///     })
///     // the old name, same shape as MoneyDeposited version 1
///     .rename("FundsDeposited", 1, "MoneyDeposited");
/// assert!(registry.check().is_ok());
/// ```
///
/// [`StoreConfig::registry`]: crate::StoreConfig::registry
#[derive(Clone, Default)]
pub struct Registry {
    names: HashMap<String, Name>,
    /// Registration mistakes, reported by [`Registry::check`].
    problems: Vec<String>,
    /// Current type → every older name whose upcasts end at it.
    aliases: HashMap<String, Vec<String>>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut types: Vec<(&str, i32)> = self
            .names
            .iter()
            .filter_map(|(n, e)| e.current.map(|v| (n.as_str(), v)))
            .collect();
        types.sort_unstable();
        let mut steps: Vec<String> = self
            .names
            .iter()
            .flat_map(|(n, e)| {
                e.steps
                    .iter()
                    .map(move |(v, s)| format!("{n} v{v} -> {} v{}", s.to_type, s.to_version))
            })
            .collect();
        steps.sort_unstable();
        f.debug_struct("Registry")
            .field("types", &types)
            .field("upcasters", &steps)
            .finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Registers every type of the [`Event`] enum `E` at its current
    /// version; appends of them are checked by decoding them into `E`.
    pub fn events<E: Event + 'static>(mut self) -> Registry {
        for t in E::types() {
            let validator: Validator =
                Arc::new(
                    |event_type, payload| match E::from_payload(event_type, payload) {
                        Some(Ok(_)) => Ok(()),
                        Some(Err(e)) => Err(e.to_string()),
                        None => Err(format!(
                            "{} does not declare it",
                            std::any::type_name::<E>()
                        )),
                    },
                );
            self.add_type(t.name, t.version, validator);
        }
        self
    }

    /// Registers one type by hand: `name` at its current `version`, with
    /// payload type `P` (appends are checked by decoding into `P`; use
    /// `serde_json::Value` to accept any JSON).
    pub fn event_type<P: DeserializeOwned + 'static>(
        mut self,
        name: impl Into<String>,
        version: i32,
    ) -> Registry {
        let validator: Validator = Arc::new(|_, payload| {
            serde_json::from_str::<P>(payload)
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
        self.add_type(&name.into(), version, validator);
        self
    }

    fn add_type(&mut self, name: &str, version: i32, validator: Validator) {
        let entry = self.names.entry(name.to_owned()).or_default();
        match entry.current {
            Some(v) if v != version => self.problems.push(format!(
                "event type {name} is registered twice, at versions {v} and {version}: register it once, at its \
                 current version"
            )),
            _ => {
                entry.current = Some(version);
                entry.validator = Some(validator);
            }
        }
    }

    /// An upcaster from `event_type` version `from_version` to version
    /// `from_version + 1` of the same type. Chains of steps are applied in
    /// turn until the current version.
    pub fn upcaster(
        self,
        event_type: impl Into<String>,
        from_version: i32,
        transform: impl Fn(Value) -> UpcastResult + Send + Sync + 'static,
    ) -> Registry {
        let event_type = event_type.into();
        let to = event_type.clone();
        self.upcaster_to(event_type, from_version, to, from_version + 1, transform)
    }

    /// A rename: events stored as `old_type` version `version` become
    /// `new_type` version `version`, payload unchanged (further upcasters of
    /// `new_type` then apply). Filters naming `new_type` also read events
    /// stored under `old_type`.
    pub fn rename(
        mut self,
        old_type: impl Into<String>,
        version: i32,
        new_type: impl Into<String>,
    ) -> Registry {
        self.add_step(
            old_type.into(),
            version,
            Step {
                to_type: Arc::from(new_type.into()),
                to_version: version,
                transform: None,
            },
        );
        self
    }

    /// The general step: `from_type` version `from_version` becomes
    /// `to_type` version `to_version` through `transform` (a rename and a
    /// change of shape at once).
    pub fn upcaster_to(
        mut self,
        from_type: impl Into<String>,
        from_version: i32,
        to_type: impl Into<String>,
        to_version: i32,
        transform: impl Fn(Value) -> UpcastResult + Send + Sync + 'static,
    ) -> Registry {
        self.add_step(
            from_type.into(),
            from_version,
            Step {
                to_type: Arc::from(to_type.into()),
                to_version,
                transform: Some(Arc::new(transform)),
            },
        );
        self
    }

    fn add_step(&mut self, from_type: String, from_version: i32, step: Step) {
        let entry = self.names.entry(from_type.clone()).or_default();
        if entry.steps.contains_key(&from_version) {
            self.problems.push(format!(
                "two upcasters start at {from_type} version {from_version}: keep one (each (type, version) has \
                 exactly one next shape)"
            ));
            return;
        }
        entry.steps.insert(from_version, step);
    }

    /// Checks the registry: no type registered twice, no two upcasters from
    /// one (type, version), every upcaster chain ends at the current version
    /// of a registered type, and no chain loops. [`StoreConfig::registry`]
    /// runs it; the error lists every problem with its fix.
    ///
    /// [`StoreConfig::registry`]: crate::StoreConfig::registry
    pub fn check(&self) -> Result<()> {
        let mut problems = self.problems.clone();
        let mut sources: Vec<(&str, i32)> = self
            .names
            .iter()
            .flat_map(|(n, e)| e.steps.keys().map(move |v| (n.as_str(), *v)))
            .collect();
        sources.sort_unstable();
        for (name, version) in sources {
            if let Some(current) = self.names.get(name).and_then(|e| e.current) {
                if version >= current {
                    problems.push(format!(
                        "an upcaster starts at {name} version {version}, but {version} is not older than its \
                         current version {current}: upcasters lead from old versions to the current one; raise \
                         the registered version or drop the upcaster"
                    ));
                    continue;
                }
            }
            if let Err(p) = self.chain_end(name, version) {
                problems.push(p);
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::config(format!(
                "the event registry is inconsistent: {}",
                problems.join("; ")
            )))
        }
    }

    /// Follows the upcasters from `(name, version)` to the current version
    /// of a registered type.
    fn chain_end(&self, name: &str, version: i32) -> std::result::Result<(String, i32), String> {
        let mut seen = HashSet::new();
        let (mut t, mut v) = (name.to_owned(), version);
        loop {
            if !seen.insert((t.clone(), v)) {
                return Err(format!(
                    "the upcasters from {name} version {version} loop back to {t} version {v}: every step must \
                     lead on to the current version"
                ));
            }
            let entry = self.names.get(&t);
            if let Some(current) = entry.and_then(|e| e.current) {
                if v == current {
                    return Ok((t, v));
                }
                if v > current {
                    return Err(format!(
                        "the upcasters from {name} version {version} lead to {t} version {v}, above its current \
                         version {current}: register {t} at its newest version"
                    ));
                }
            }
            match entry.and_then(|e| e.steps.get(&v)) {
                Some(step) => {
                    t = step.to_type.to_string();
                    v = step.to_version;
                }
                None => {
                    return Err(match entry.and_then(|e| e.current) {
                        Some(current) => format!(
                            "the upcasters from {name} version {version} stop at {t} version {v}, below its \
                             current version {current}: add an upcaster from {t} version {v}"
                        ),
                        None => format!(
                            "the upcasters from {name} version {version} lead to {t} version {v}, a type the \
                             registry does not register: register {t} (Registry::events or \
                             Registry::event_type)"
                        ),
                    })
                }
            }
        }
    }

    /// Checks, then indexes the old names of every current type (for
    /// filters). Run by [`StoreConfig::registry`](crate::StoreConfig::registry).
    pub(crate) fn sealed(mut self) -> Result<Registry> {
        self.check()?;
        let mut aliases: HashMap<String, Vec<String>> = HashMap::new();
        for (name, entry) in &self.names {
            for version in entry.steps.keys() {
                if let Ok((end, _)) = self.chain_end(name, *version) {
                    if end != *name {
                        let old = aliases.entry(end).or_default();
                        if !old.contains(name) {
                            old.push(name.clone());
                        }
                    }
                }
            }
        }
        for old in aliases.values_mut() {
            old.sort_unstable();
        }
        self.aliases = aliases;
        Ok(self)
    }

    /// The current version of `event_type`, when it is registered.
    pub fn current_version(&self, event_type: &str) -> Option<i32> {
        self.names.get(event_type).and_then(|e| e.current)
    }

    /// Whether `event_type` is a registered (current) type.
    pub fn is_registered(&self, event_type: &str) -> bool {
        self.current_version(event_type).is_some()
    }

    /// Every event type name stored events may carry and that upcasts to
    /// one of `types`: `types` themselves and their old names. Filters are
    /// expanded with it, so a filter written with current names also reads
    /// events stored under old ones.
    pub fn stored_names(&self, types: &[String]) -> Vec<String> {
        let mut all = types.to_vec();
        for t in types {
            for old in self.aliases.get(t).into_iter().flatten() {
                if !all.contains(old) {
                    all.push(old.clone());
                }
            }
        }
        all
    }

    /// Brings `event` to the current shape of its type: applies the
    /// upcasters from its stored (type, version) in turn, changing its
    /// `event_type`, `event_version` and payload. An event already current,
    /// or one the registry cannot bring further (an unregistered type, a
    /// newer version), is left as it is. On error `event` is unchanged; the
    /// error (a payload error) names the event and the failing step.
    ///
    /// Public so that upcasters can be unit-tested on a
    /// [`StoredEvent::from_new`] event.
    pub fn upcast(&self, event: &mut StoredEvent) -> Result<()> {
        let Some(entry) = self.names.get(event.event_type.as_str()) else {
            return Ok(());
        };
        if entry.current == Some(event.event_version) {
            return Ok(());
        }
        let Some(mut step) = entry.steps.get(&event.event_version) else {
            return Ok(());
        };
        // Parse only once a step changes the payload; renames alone keep
        // the stored text.
        let mut value: Option<Value> = None;
        let (mut from_type, mut from_version): (&str, i32) =
            (&event.event_type, event.event_version);
        // A checked registry has no loops; an unchecked one is cut short.
        let mut budget = self.names.values().map(|e| e.steps.len()).sum::<usize>();
        loop {
            if let Some(transform) = &step.transform {
                let input = match value.take() {
                    Some(v) => v,
                    None => serde_json::from_str(&event.payload).map_err(|e| {
                        self.step_error(
                            event,
                            from_type,
                            from_version,
                            step,
                            format!("the payload is not JSON: {e}"),
                        )
                    })?,
                };
                value = Some(transform(input).map_err(|e| {
                    self.step_error(event, from_type, from_version, step, e.to_string())
                })?);
            }
            let to_version = step.to_version;
            match self.names.get_key_value(&*step.to_type) {
                Some((key, n)) if n.current != Some(to_version) && budget > 0 => {
                    if let Some(next) = n.steps.get(&to_version) {
                        budget -= 1;
                        step = next;
                        from_type = key;
                        from_version = to_version;
                        continue;
                    }
                }
                _ => {}
            }
            break;
        }
        let (to_type, to_version) = (step.to_type.to_string(), step.to_version);
        if let Some(value) = value {
            event.payload = serde_json::to_string(&value)?;
        }
        event.event_type = to_type;
        event.event_version = to_version;
        Ok(())
    }

    fn step_error(&self, event: &StoredEvent, t: &str, v: i32, step: &Step, why: String) -> Error {
        Error::new(
            Kind::Payload,
            format!(
                "cannot upcast the {} version {} event at global position {} ({} {} v{}): the upcaster from {t} \
                 version {v} to {} version {} failed: {why}. Fix the upcaster or the stored payload",
                event.event_type,
                event.event_version,
                event.global_position,
                event.aggregate_type,
                event.aggregate_id,
                event.aggregate_version,
                step.to_type,
                step.to_version
            ),
        )
    }

    /// Why an (already upcast) event is not a current registered shape;
    /// `None` when it is. Unregistered types count only when `strict`.
    pub(crate) fn unknown(&self, event: &StoredEvent, strict: bool) -> Option<Unknown> {
        match self.current_version(&event.event_type) {
            Some(current) if current == event.event_version => None,
            Some(current) if event.event_version > current => {
                Some(Unknown::NewerVersion { current })
            }
            Some(current) => Some(Unknown::NoUpcaster { current }),
            None if strict => Some(Unknown::UnregisteredType),
            None => None,
        }
    }

    /// Refuses an append of a type or version the registry does not know
    /// as current, or of a payload that does not decode into its type.
    pub(crate) fn check_append(&self, event: &NewEvent) -> Result<()> {
        let name = event.event_type.as_str();
        let Some(entry) = self.names.get(name).filter(|e| e.current.is_some()) else {
            let hint = match self
                .aliases
                .iter()
                .find(|(_, old)| old.iter().any(|o| o == name))
            {
                Some((new, _)) => format!(" ({name} is an old name of {new}: append {new})"),
                None => String::new(),
            };
            return Err(Error::config(format!(
                "cannot append a {name} event: the store's event registry does not register the type{hint}; \
                 register it (Registry::events or Registry::event_type) or fix the type name. Nothing was written"
            )));
        };
        let current = entry.current.unwrap_or_default();
        if event.event_version != current {
            return Err(Error::config(format!(
                "cannot append {name} version {}: the registry's current version of {name} is {current}, and \
                 appends are written in the current shape; build the event with NewEvent::typed (or \
                 with_event_version({current}) and the current payload). Nothing was written",
                event.event_version
            )));
        }
        if let Some(validate) = &entry.validator {
            validate(name, &event.payload).map_err(|why| {
                Error::new(
                    Kind::Payload,
                    format!(
                        "cannot append {name} version {current}: its payload does not decode into the registered \
                         type: {why}. Fix the payload (or the registered type). Nothing was written"
                    ),
                )
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn v1_to_v2(v1: Value) -> UpcastResult {
        let amount = v1.get("amount").cloned().ok_or("no amount field")?;
        Ok(json!({ "cents": amount, "currency": "EUR" }))
    }

    fn bank() -> Registry {
        Registry::new()
            .event_type::<Value>("MoneyDeposited", 2)
            .event_type::<Value>("AccountOpened", 1)
            .upcaster("MoneyDeposited", 1, v1_to_v2)
            .rename("FundsDeposited", 1, "MoneyDeposited")
            .sealed()
            .unwrap()
    }

    fn stored(event_type: &str, version: i32, payload: Value) -> StoredEvent {
        StoredEvent::from_new(
            &NewEvent::new(event_type, &payload)
                .unwrap()
                .with_event_version(version),
            "Account",
            "a-1",
            1,
        )
    }

    #[test]
    fn a_chain_renames_then_upcasts() {
        let r = bank();
        let mut e = stored("FundsDeposited", 1, json!({ "amount": 5 }));
        r.upcast(&mut e).unwrap();
        assert_eq!(
            (e.event_type.as_str(), e.event_version),
            ("MoneyDeposited", 2)
        );
        assert_eq!(
            e.payload_value().unwrap(),
            json!({ "cents": 5, "currency": "EUR" })
        );
        // Current events are untouched.
        let mut c = stored(
            "MoneyDeposited",
            2,
            json!({ "cents": 1, "currency": "EUR" }),
        );
        let before = c.clone();
        r.upcast(&mut c).unwrap();
        assert_eq!(c, before);
    }

    #[test]
    fn a_failing_step_names_the_event_and_leaves_it_unchanged() {
        let r = bank();
        let mut e = stored("MoneyDeposited", 1, json!({ "amt": 5 }));
        let before = e.clone();
        let err = r.upcast(&mut e).unwrap_err();
        assert!(err.is_payload());
        let m = err.to_string();
        assert!(
            m.contains("MoneyDeposited version 1") && m.contains("no amount field"),
            "{m}"
        );
        assert_eq!(e, before);
    }

    #[test]
    fn unknown_versions_and_types_are_classified() {
        let r = bank();
        let newer = stored("MoneyDeposited", 3, json!({}));
        assert_eq!(
            r.unknown(&newer, false),
            Some(Unknown::NewerVersion { current: 2 })
        );
        let other = stored("AccountClosed", 1, json!({}));
        assert_eq!(r.unknown(&other, false), None);
        assert_eq!(r.unknown(&other, true), Some(Unknown::UnregisteredType));
        let m = Unknown::NewerVersion { current: 2 }.describe(&newer, "p");
        assert!(
            m.contains("MoneyDeposited version 3") && m.contains("deploy the newer binary"),
            "{m}"
        );
    }

    #[test]
    fn filters_expand_with_old_names() {
        let r = bank();
        assert_eq!(
            r.stored_names(&["MoneyDeposited".to_owned()]),
            vec!["MoneyDeposited".to_owned(), "FundsDeposited".to_owned()]
        );
    }

    #[test]
    fn inconsistent_registries_are_refused_with_the_fix() {
        let gap = Registry::new()
            .event_type::<Value>("X", 3)
            .upcaster("X", 1, Ok)
            .check()
            .unwrap_err()
            .to_string();
        assert!(gap.contains("add an upcaster from X version 2"), "{gap}");
        let looped = Registry::new()
            .rename("A", 1, "B")
            .rename("B", 1, "A")
            .check()
            .unwrap_err()
            .to_string();
        assert!(looped.contains("loop"), "{looped}");
        let twice = Registry::new()
            .event_type::<Value>("X", 2)
            .event_type::<Value>("X", 3)
            .check()
            .unwrap_err()
            .to_string();
        assert!(twice.contains("registered twice"), "{twice}");
    }

    #[test]
    fn appends_are_checked() {
        let r = Registry::new()
            .event_type::<std::collections::BTreeMap<String, i64>>("MoneyDeposited", 2)
            .rename("FundsDeposited", 2, "MoneyDeposited")
            .sealed()
            .unwrap();
        let ok = NewEvent::new("MoneyDeposited", &json!({ "cents": 1 }))
            .unwrap()
            .with_event_version(2);
        r.check_append(&ok).unwrap();
        let old = ok.clone().with_event_version(1);
        assert!(r
            .check_append(&old)
            .unwrap_err()
            .to_string()
            .contains("current version"));
        let bad = NewEvent::new("MoneyDeposited", &json!({ "cents": "x" }))
            .unwrap()
            .with_event_version(2);
        let e = r.check_append(&bad).unwrap_err();
        assert!(
            e.is_payload() && e.to_string().contains("does not decode"),
            "{e}"
        );
        let renamed = NewEvent::new("FundsDeposited", &json!({})).unwrap();
        let m = r.check_append(&renamed).unwrap_err().to_string();
        assert!(m.contains("old name of MoneyDeposited"), "{m}");
    }
}
