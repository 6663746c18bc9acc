//! TLS to PostgreSQL: a private server with a certificate this test makes
//! (its own CA), reached over TCP with sslmode=require and verify-full.

use crate::cli::{bank, text};
use projectionist::testing::TestServer;
use projectionist::{EventStore, StoreConfig};
use std::os::unix::fs::MetadataExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_and_verify_full_connect_encrypted_and_bad_certificates_are_refused() {
    let server = TestServer::start_private().await.unwrap();
    let db = server.create_database().await.unwrap();
    let data = server.data_dir().unwrap().to_path_buf();
    let owner = std::fs::metadata(&data).unwrap();

    // A CA and a server certificate for 127.0.0.2 (loopback, so it cannot
    // clash with a server on 127.0.0.1).
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "projectionist test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let server_key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["127.0.0.2".to_owned()]).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let cert = params.signed_by(&server_key, &issuer).unwrap();
    let write = |name: &str, body: String, mode: u32| {
        let path = data.join(name);
        std::fs::write(&path, body).unwrap();
        std::os::unix::fs::chown(&path, Some(owner.uid()), Some(owner.gid())).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    write("server.crt", cert.pem(), 0o644);
    write("server.key", server_key.serialize_pem(), 0o600);
    let ca_file =
        std::env::temp_dir().join(format!("projectionist-test-ca-{}.pem", std::process::id()));
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let hba = data.join("pg_hba.conf");
    let old = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(&hba, format!("{old}\nhost all all 127.0.0.2/32 trust\n")).unwrap();
    let c = db.connect().await.unwrap();
    for setting in [
        "ALTER SYSTEM SET ssl = on",
        "ALTER SYSTEM SET listen_addresses = '127.0.0.2'",
        "ALTER SYSTEM SET ssl_cert_file = 'server.crt'",
        "ALTER SYSTEM SET ssl_key_file = 'server.key'",
    ] {
        c.batch_execute(setting).await.unwrap();
    }
    drop(c);
    tokio::task::block_in_place(|| {
        server.stop().unwrap();
        server.start().unwrap();
    });

    let base = format!("postgres://postgres@127.0.0.2:5432/{}", db.name());
    for (url, ca) in [
        (format!("{base}?sslmode=require"), None),
        (
            format!("{base}?sslmode=verify-full"),
            Some(ca_file.as_path()),
        ),
        (
            format!("{base}?sslmode=verify-ca&sslrootcert={}", ca_file.display()),
            None,
        ),
    ] {
        let store = EventStore::connect_with(&url, StoreConfig::default().ca_file(ca)).unwrap();
        let client = store
            .pool()
            .get()
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        let ssl: bool = client
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(ssl, "{url} is encrypted");
    }

    // The command line: migrate and status over verify-full with a CA file.
    let run = |url: &str, ca: Option<&std::path::Path>, args: &[&str]| {
        let mut cmd = bank();
        cmd.env("DATABASE_URL", url)
            .env("CONNECT_TIMEOUT", "5s")
            .args(args);
        match ca {
            Some(ca) => cmd.env("DATABASE_CA_FILE", ca),
            None => cmd.env_remove("DATABASE_CA_FILE"),
        };
        cmd.output().unwrap()
    };
    let full = format!("{base}?sslmode=verify-full");
    let o = run(&full, Some(&ca_file), &["migrate"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = run(&full, Some(&ca_file), &["status", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    // Without the CA the certificate is refused at once, with the fix named.
    let started = std::time::Instant::now();
    let o = run(&full, None, &["status"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("certificate"),
        "{}",
        text(&o)
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(4),
        "not retried until the timeout"
    );
    // A missing CA file is a usage error.
    let o = run(
        &full,
        Some(std::path::Path::new("/nonexistent/ca.pem")),
        &["status"],
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("cannot read the CA file"),
        "{}",
        text(&o)
    );
    let _ = std::fs::remove_file(&ca_file);
}
