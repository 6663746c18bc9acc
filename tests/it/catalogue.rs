//! The bad-input catalogue: every mistake a user can make gets a message
//! naming the cause and the fix, exit code 2 for usage errors and 1 for
//! runtime errors, no panic, and no change to any table.

use crate::cli::{bank, run, text};
use projectionist::testing::{TestDatabase, TestServer};
use std::process::Output;

/// Row counts and checkpoint contents of every projectionist table.
async fn fingerprint(db: &TestDatabase) -> String {
    let c = db.connect().await.unwrap();
    let r = c
        .query_one(
            "SELECT (SELECT count(*) FROM events)::text || '/' || \
                    (SELECT count(*) FROM dead_letters)::text || '/' || \
                    (SELECT count(*) FROM worker_nodes)::text || '/' || \
                    (SELECT count(*) FROM consumer_assignments)::text || '/' || \
                    coalesce((SELECT string_agg(projection_name || partition_key || total_partitions || \
                              last_transaction_id::text || last_global_position || status, ',' \
                              ORDER BY projection_name, partition_key) FROM projection_checkpoints), '') || '/' || \
                    (SELECT count(*) FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema'))::text",
            &[],
        )
        .await
        .unwrap();
    r.get(0)
}

/// Arguments, environment, and what stderr must say.
type Case<'a> = (&'a [&'a str], Vec<(&'a str, &'a str)>, Vec<&'a str>);

fn check(o: &Output, code: i32, needles: &[&str]) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(code), "{}", text(o));
    for n in needles {
        assert!(err.contains(n), "expected {n:?} in:\n{}", text(o));
    }
    assert!(!err.contains("panicked"), "{}", text(o));
}

#[tokio::test]
async fn usage_errors_exit_2_name_the_fix_and_change_nothing() {
    let db = TestDatabase::create().await.unwrap();
    let o = run(&db, &["migrate"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let o = run(
        &db,
        &[
            "simulate",
            "--accounts",
            "3",
            "--events",
            "30",
            "--writers",
            "1",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    let o = run(&db, &["run-projections", "--once"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let before = fingerprint(&db).await;

    let once = ["run-projections", "--once"];
    let cases: Vec<Case> = vec![
        (
            &once,
            vec![("PARTITION_KEY", "5"), ("TOTAL_PARTITIONS", "2")],
            vec!["PARTITION_KEY 5 is out of range", "0 to 1"],
        ),
        (
            &once,
            vec![("PARTITION_KEY", "-1"), ("TOTAL_PARTITIONS", "2")],
            vec!["PARTITION_KEY -1 is out of range"],
        ),
        (
            &once,
            vec![("PARTITION_KEY", "one"), ("TOTAL_PARTITIONS", "2")],
            vec!["invalid value 'one'"],
        ),
        (
            &once,
            vec![("TOTAL_PARTITIONS", "0")],
            vec!["TOTAL_PARTITIONS 0 is invalid", "1 or more"],
        ),
        (
            &once,
            vec![("TOTAL_PARTITIONS", "3")],
            vec!["made with 1 partition(s)", "reset"],
        ),
        (
            &once,
            vec![("BATCH_SIZE", "0")],
            vec!["BATCH_SIZE 0 is out of range", "from 1 to 100000"],
        ),
        (
            &once,
            vec![("BATCH_SIZE", "99999999999")],
            vec!["BATCH_SIZE 99999999999 is out of range"],
        ),
        (
            &once,
            vec![("POLL_INTERVAL", "soon")],
            vec!["POLL_INTERVAL \"soon\" is not a duration", "200ms"],
        ),
        (
            &once,
            vec![("DISPATCHER", "kafka")],
            vec!["unknown dispatcher \"kafka\"", "DISPATCHER=poll"],
        ),
        (
            &once,
            vec![("LOG_FORMAT", "xml")],
            vec!["invalid value 'xml'", "text, json"],
        ),
        (
            &["run-projections", "--once", "--projection", "nope"],
            vec![],
            vec!["unknown projection \"nope\"", "account_balances"],
        ),
        (
            &["reset", "nope", "--yes"],
            vec![],
            vec!["unknown projection \"nope\""],
        ),
        (
            &once,
            vec![("PROJECTIONIST_SCHEMA", "x\"; DROP TABLE events; --")],
            vec!["invalid schema name", "plain identifier"],
        ),
        (
            &once,
            vec![("NOTIFY_CHANNEL", "bad-channel")],
            vec!["invalid NOTIFY channel name", "plain identifier"],
        ),
        (
            &["migrate"],
            vec![("PROJECTIONIST_SCHEMA", "1; DROP TABLE events")],
            vec!["invalid schema name"],
        ),
        (
            &once,
            vec![("RUN_MODE", "worker")],
            vec!["--once runs static partitions only"],
        ),
        (
            &["run-projections"],
            vec![
                ("RUN_MODE", "worker"),
                ("PROJECTION_PARTITIONS", "account_balances"),
            ],
            vec!["not name=count"],
        ),
        (
            &["run-projections"],
            vec![
                ("RUN_MODE", "worker"),
                ("HEARTBEAT_INTERVAL", "5s"),
                ("HEARTBEAT_TIMEOUT", "1s"),
            ],
            vec!["HEARTBEAT_TIMEOUT", "longer than HEARTBEAT_INTERVAL"],
        ),
        (
            &["run-projections"],
            vec![("ADMIN_ADDR", "everywhere")],
            vec!["ADMIN_ADDR \"everywhere\" is not an address", "off"],
        ),
        (
            &["dlq", "show", "424242"],
            vec![],
            vec!["no dead letter with id 424242", "dlq list"],
        ),
    ];
    for (args, env, needles) in cases {
        let o = run(&db, args, &env);
        check(&o, 2, &needles);
        assert_eq!(
            fingerprint(&db).await,
            before,
            "{args:?} {env:?} changed a table"
        );
    }

    // A malformed DATABASE_URL: usage error, and the URL's password is not echoed.
    let o = bank()
        .env("DATABASE_URL", "postgres://me:s3cret@localhost:notaport/db")
        .args(["status"])
        .output()
        .unwrap();
    check(
        &o,
        2,
        &[
            "invalid DATABASE_URL",
            "postgres://USER:PASSWORD@HOST:5432/DBNAME",
        ],
    );
    assert!(!String::from_utf8_lossy(&o.stderr).contains("s3cret"));
    let o = bank()
        .env_remove("DATABASE_URL")
        .args(["status"])
        .output()
        .unwrap();
    check(&o, 2, &["DATABASE_URL is not set"]);
}

#[tokio::test]
async fn runtime_errors_exit_1_with_the_cause() {
    // Unknown host.
    let o = bank()
        .env(
            "DATABASE_URL",
            "postgres://postgres@no-such-host.invalid:5432/x",
        )
        .env("CONNECT_TIMEOUT", "1s")
        .args(["status"])
        .output()
        .unwrap();
    check(
        &o,
        1,
        &[
            "could not connect to postgres@no-such-host.invalid:5432/x",
            "DATABASE_URL",
        ],
    );

    // run-projections before migrate: told to migrate, and nothing created.
    let db = TestDatabase::create().await.unwrap();
    let o = run(&db, &["run-projections", "--once"], &[]);
    check(&o, 1, &["run `migrate` first"]);
    let c = db.connect().await.unwrap();
    let tables: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_refused_at_once() {
    let server = TestServer::start_private().await.unwrap();
    let db = server.create_database().await.unwrap();
    let c = db.connect().await.unwrap();
    c.batch_execute(
        "SET password_encryption = 'scram-sha-256'; CREATE ROLE app LOGIN PASSWORD 'right'",
    )
    .await
    .unwrap();
    // Password authentication for `app` on the socket.
    let hba = server.data_dir().unwrap().join("pg_hba.conf");
    let old = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(&hba, format!("local all app scram-sha-256\n{old}")).unwrap();
    c.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    let host = db.config().get_hosts().first().map(|h| match h {
        tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        tokio_postgres::config::Host::Tcp(h) => h.clone(),
    });
    let url = format!(
        "host={} port=5432 user=app password=wrong dbname={}",
        host.unwrap(),
        db.name()
    );
    let started = std::time::Instant::now();
    let o = bank()
        .env("DATABASE_URL", &url)
        .env("CONNECT_TIMEOUT", "30s")
        .args(["status"])
        .output()
        .unwrap();
    check(&o, 1, &["refused the login", "check the user and password"]);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "not retried for the whole timeout"
    );
    assert!(
        !String::from_utf8_lossy(&o.stderr).contains("wrong"),
        "the password is not echoed"
    );
}
