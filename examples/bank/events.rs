//! The bank's domain events: one `Account` stream per account, holding
//! `AccountOpened`, `MoneyDeposited` and `MoneyWithdrawn` events. Amounts
//! are integer cents, so sums are exact.

use serde::{Deserialize, Serialize};

/// The aggregate (stream) type of every bank event.
pub const ACCOUNT: &str = "Account";

/// Event type of [`AccountOpened`].
pub const ACCOUNT_OPENED: &str = "AccountOpened";
/// Event type of [`MoneyDeposited`].
pub const MONEY_DEPOSITED: &str = "MoneyDeposited";
/// Event type of [`MoneyWithdrawn`].
pub const MONEY_WITHDRAWN: &str = "MoneyWithdrawn";

/// `AccountOpened {"owner": "..."}`: the first event of an account.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountOpened {
    /// The account holder.
    pub owner: String,
}

/// `MoneyDeposited {"amount": cents}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoneyDeposited {
    /// Amount in cents.
    pub amount: i64,
}

/// `MoneyWithdrawn {"amount": cents}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoneyWithdrawn {
    /// Amount in cents.
    pub amount: i64,
}
