//! The given-when-then helper (`projectionist::testing::ProjectionTest`) and
//! the server it picks: `PROJECTIONIST_TEST_DATABASE_URL`, never
//! `DATABASE_URL`.

use projectionist::testing::{ProjectionTest, TestDatabase, TestServer, TEST_DATABASE_URL};
use projectionist::{
    async_trait, Context, NewEvent, Projection, ProjectionOptions, Registered, Registry,
    StoredEvent, UnknownEvents,
};
use serde::{Deserialize, Serialize};
use std::process::Command;
use std::sync::Arc;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct ItemAdded {
    item: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct ItemDone {
    item: String,
}

projectionist::events! {
    /// A to-do list's events.
    #[derive(Clone, Debug)]
    enum ListEvent {
        /// An item was added.
        Added(ItemAdded) = ("ItemAdded", 1),
        /// An item was done.
        Done(ItemDone) = ("ItemDone", 1),
    }
}

fn registry() -> Registry {
    Registry::new().events::<ListEvent>()
}

/// `open_items(list, item)`: the items added and not yet done.
struct OpenItems;

#[async_trait]
impl Projection for OpenItems {
    fn options(&self) -> ProjectionOptions {
        ProjectionOptions::new("open_items")
            .tables(["open_items"])
            .unknown_events(UnknownEvents::StopOnUnknownType)
    }

    async fn migrate(&self, ctx: &Context<'_>) -> projectionist::Result<()> {
        ctx.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {} (list text, item text, PRIMARY KEY (list, item))",
            ctx.table("open_items")
        ))
        .await?;
        Ok(())
    }

    async fn handle(&self, event: &StoredEvent, ctx: &Context<'_>) -> projectionist::Result<()> {
        let table = ctx.table("open_items");
        match event.typed::<ListEvent>()? {
            ListEvent::Added(e) => {
                ctx.execute(
                    &format!("INSERT INTO {table} VALUES ($1, $2) ON CONFLICT DO NOTHING"),
                    &[&event.aggregate_id, &e.item],
                )
                .await?;
            }
            ListEvent::Done(e) => {
                ctx.execute(
                    &format!("DELETE FROM {table} WHERE list = $1 AND item = $2"),
                    &[&event.aggregate_id, &e.item],
                )
                .await?;
            }
        }
        Ok(())
    }
}

async fn open_items(test: &ProjectionTest) -> Vec<(String, String)> {
    test.query("SELECT list, item FROM open_items ORDER BY list, item", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

fn added(item: &str) -> ListEvent {
    ListEvent::Added(ItemAdded { item: item.into() })
}

fn done(item: &str) -> ListEvent {
    ListEvent::Done(ItemDone { item: item.into() })
}

#[tokio::test]
async fn given_typed_events_when_a_projection_runs_then_its_rows_are_queried() {
    let test = ProjectionTest::new()
        .await
        .unwrap()
        .registry(registry())
        .unwrap()
        .given(
            "List",
            "groceries",
            [added("milk"), added("eggs"), done("milk")],
        )
        .await
        .unwrap()
        .given(
            "List",
            "chores",
            [NewEvent::typed(&added("dishes")).unwrap()],
        )
        .await
        .unwrap()
        .when(Arc::new(OpenItems))
        .await
        .unwrap();
    let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect()
    };
    assert_eq!(
        open_items(&test).await,
        pairs(&[("chores", "dishes"), ("groceries", "eggs")])
    );
    // The view readers query is over the version's own table.
    let row = test
        .query_one("SELECT count(*) FROM open_items_v1", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 2);

    // given/when alternate: the second run continues from the checkpoint.
    let registered = Registered::new(Arc::new(OpenItems)).unwrap();
    let test = test
        .given("List", "chores", [done("dishes")])
        .await
        .unwrap()
        .when_all(std::slice::from_ref(&registered))
        .await
        .unwrap();
    assert_eq!(open_items(&test).await, pairs(&[("groceries", "eggs")]));
    let handled = test
        .query_one(
            "SELECT events_handled FROM projection_checkpoints WHERE projection_name = 'open_items'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(handled.get::<_, i64>(0), 5, "every event handled once");

    // The registry validates appends: nothing is written.
    let test = match test
        .given("List", "x", [NewEvent::from_json("ItemLost", "{}")])
        .await
    {
        Ok(_) => panic!("an unregistered type was appended"),
        Err(e) => {
            assert!(e.is_config() || e.is_payload(), "{e}");
            None::<ProjectionTest>
        }
    };
    assert!(test.is_none());
}

#[tokio::test]
async fn when_fails_with_the_engines_error_when_a_projection_stops() {
    let test = ProjectionTest::new()
        .await
        .unwrap()
        .registry(registry())
        .unwrap()
        .given("List", "groceries", [added("milk")])
        .await
        .unwrap();
    // A newer release's event, written with plain SQL.
    test.execute(
        "INSERT INTO events (aggregate_type, aggregate_id, aggregate_version, event_type, event_version, payload) \
         VALUES ('List', 'groceries', 2, 'ItemAdded', 2, '{\"item\": \"bread\", \"qty\": 2}')",
        &[],
    )
    .await
    .unwrap();
    let e = test
        .when(Arc::new(OpenItems))
        .await
        .expect_err("an unknown version must stop the projection");
    assert!(e.is_failed(), "{e}");
    assert!(e.to_string().contains("ItemAdded"), "{e}");
}

/// Set in the environment of the child runs of [`child_reports_its_server`].
const CHILD: &str = "PROJECTIONIST_TESTING_HELPER_CHILD";

/// Runs in a child process started by the tests below (a no-op otherwise):
/// reports which server the helper picked and the database it made there.
#[tokio::test]
async fn child_reports_its_server() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    let server = TestServer::shared().unwrap();
    let kind = if server.data_dir().is_some() {
        "throwaway"
    } else {
        "url"
    };
    let test = ProjectionTest::new()
        .await
        .unwrap()
        .given("Door", "front", [NewEvent::from_json("Opened", "{}")])
        .await
        .unwrap();
    println!("SERVER={kind} DATABASE={}", test.database().name());
}

/// Runs [`child_reports_its_server`] in a child process with `env` (and
/// without the helper's variable unless `env` sets it); returns its output.
fn run_child(env: &[(&str, &str)]) -> String {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(exe);
    cmd.args([
        "testing_helper::child_reports_its_server",
        "--exact",
        "--nocapture",
        "--test-threads=1",
    ])
    .env_remove(TEST_DATABASE_URL)
    .env_remove("DATABASE_URL")
    .env(CHILD, "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "child failed:\n{text}");
    text
}

#[tokio::test]
async fn database_url_alone_is_ignored_by_the_helper() {
    // An application's server that refuses every connection: the helper
    // must not even try it.
    let out = run_child(&[("DATABASE_URL", "postgres://app@127.0.0.1:1/app")]);
    assert!(out.contains("SERVER=throwaway DATABASE="), "{out}");
}

#[tokio::test]
async fn the_helpers_own_variable_names_its_server() {
    // Point the child at this process's server through the variable, and
    // find the database it created there.
    let parent = TestDatabase::create().await.unwrap();
    let out = run_child(&[
        (TEST_DATABASE_URL, &parent.url()),
        ("DATABASE_URL", "postgres://app@127.0.0.1:1/app"),
    ]);
    let name = out
        .split("SERVER=url DATABASE=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no database reported:\n{out}"))
        .to_owned();
    let client = parent.connect().await.unwrap();
    let found = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await
        .unwrap();
    assert!(
        found.is_some(),
        "{name} is not on the server in {TEST_DATABASE_URL}"
    );
}
