//! The bank's domain events: one `Account` stream per account, holding
//! `AccountOpened`, `MoneyDeposited` and `MoneyWithdrawn` events, declared
//! once in [`BankEvent`]. Amounts are integer cents, so sums are exact.
//!
//! The events have evolved, as real ones do; [`registry`] brings the old
//! shapes up to date on every read, so the projections only know the
//! current ones:
//! - `MoneyDeposited` and `MoneyWithdrawn` version 1 were `{"amount": N}`;
//!   version 2 is `{"cents": N, "currency": "EUR"}`;
//! - deposits were once called `FundsDeposited` (version 1,
//!   `{"amount": N}`): renamed to `MoneyDeposited` version 1, then upcast.

use projectionist::{Registry, UpcastResult};
use serde::{Deserialize, Serialize};

/// The aggregate (stream) type of every bank event.
pub const ACCOUNT: &str = "Account";

/// Event type of [`MoneyDeposited`].
pub const MONEY_DEPOSITED: &str = "MoneyDeposited";
/// Event type of [`MoneyWithdrawn`].
pub const MONEY_WITHDRAWN: &str = "MoneyWithdrawn";
/// The old name of `MoneyDeposited` (version 1 only).
pub const FUNDS_DEPOSITED: &str = "FundsDeposited";
/// The currency of every amount written before version 2.
pub const EUR: &str = "EUR";

/// `AccountOpened {"owner": "..."}`: the first event of an account.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountOpened {
    /// The account holder.
    pub owner: String,
}

/// `MoneyDeposited {"cents": N, "currency": "EUR"}` (version 2).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoneyDeposited {
    /// Amount in cents.
    pub cents: i64,
    /// ISO 4217 currency code.
    pub currency: String,
}

/// `MoneyWithdrawn {"cents": N, "currency": "EUR"}` (version 2).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoneyWithdrawn {
    /// Amount in cents.
    pub cents: i64,
    /// ISO 4217 currency code.
    pub currency: String,
}

projectionist::events! {
    /// Everything that happens to an account, at the current versions.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub enum BankEvent {
        /// The first event of an account.
        Opened(AccountOpened) = ("AccountOpened", 1),
        /// Money came in.
        Deposited(MoneyDeposited) = ("MoneyDeposited", 2),
        /// Money went out.
        Withdrawn(MoneyWithdrawn) = ("MoneyWithdrawn", 2),
    }
}

/// Version 1 `{"amount": N}` to version 2 `{"cents": N, "currency": "EUR"}`.
pub fn amount_to_cents(v1: serde_json::Value) -> UpcastResult {
    let amount = v1
        .get("amount")
        .cloned()
        .ok_or("a version 1 payload has an \"amount\" field, this one has none")?;
    Ok(serde_json::json!({ "cents": amount, "currency": EUR }))
}

/// The bank's event types and the upcasters of their older shapes.
pub fn registry() -> Registry {
    Registry::new()
        .events::<BankEvent>()
        .upcaster(MONEY_DEPOSITED, 1, amount_to_cents)
        .upcaster(MONEY_WITHDRAWN, 1, amount_to_cents)
        .rename(FUNDS_DEPOSITED, 1, MONEY_DEPOSITED)
}
