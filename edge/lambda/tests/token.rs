//! Production credentials: a service-account key becomes an RS256-signed JWT, exchanged at the
//! token endpoint for an access token that Pub/Sub calls carry, cached until shortly before
//! it expires. `stack::google::FakeGoogle` plays Google's token endpoint and Pub/Sub, and
//! verifies the JWT's signature with the key's public half. (The Worker's WebCrypto signing is
//! checked the same way in `tests/tests/edge.rs`.)

use edge_core::gcp::{Gcp, GcpConfig, ServiceAccount};
use edge_lambda::Native;
use stack::google::{FakeGoogle, TEST_CLIENT_EMAIL};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_account_jwt_is_signed_exchanged_and_cached() {
    let google = FakeGoogle::start("p", "t").await.expect("fake google");
    let base = google.base.clone();
    let sa: ServiceAccount =
        serde_json::from_value(google.service_account()).expect("service-account JSON");
    let gcp = Gcp::new(
        GcpConfig {
            project: "p".into(),
            topic: "t".into(),
            chat_topic: "t".into(),
            database: "(default)".into(),
            pubsub_base: base.clone(),
            firestore_base: base.clone(),
            pubsub_emulated: false,
            firestore_emulated: false,
            deadline_ms: 3000,
        },
        Some(sa),
    );
    let p = Native::new();
    for n in 1..=3 {
        let ids = gcp
            .publish(
                &p,
                "t",
                &[(b"{}".to_vec(), vec![("job_id", "j".to_owned())])],
            )
            .await
            .expect("publish");
        assert_eq!(ids, [n.to_string()]);
    }
    let s = google.seen();
    assert_eq!((s.tokens_issued, s.refused), (1, 0), "the token is cached");
    assert_eq!(s.publish_auth, ["Bearer tok-1"; 3]);
    let c = &s.claims[0];
    assert_eq!(c["iss"], TEST_CLIENT_EMAIL);
    assert_eq!(c["aud"], format!("{base}/token").as_str());
    assert_eq!(c["scope"], "https://www.googleapis.com/auth/cloud-platform");
    let (iat, exp) = (
        c["iat"].as_u64().unwrap_or(0),
        c["exp"].as_u64().unwrap_or(0),
    );
    assert_eq!(exp - iat, 3600);
}
