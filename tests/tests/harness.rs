//! The harness itself: the real emulators come up, round-trip a message and a document with a
//! precondition, and leave no process behind.

use serde_json::json;
use stack::emulators::Emulators;
use stack::gcp::{Firestore, PubSub, Topology, Write};

fn log_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("harness-logs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emulators_round_trip_a_message_and_a_document_then_leave_nothing_running() {
    let mut emu = Emulators::start(&log_dir()).await.expect("emulators start");

    // Pub/Sub: topology with dead-letter policy, publish, pull, ack.
    let ps = PubSub::new(&emu.pubsub_host);
    let t = Topology::unique("harness-test");
    ps.create_topology(&t, 30, 5).await.expect("topology");
    let id = ps
        .publish(
            &t.project,
            &t.topic,
            "작업 1".as_bytes(),
            &[("job_id", "j1")],
        )
        .await
        .expect("publish");
    assert!(!id.is_empty());
    let got = stack::wait_for("message", std::time::Duration::from_secs(20), || {
        let ps = ps.clone();
        let (p, s) = (t.project.clone(), t.subscription.clone());
        async move { ps.pull(&p, &s, 10).await.ok().filter(|m| !m.is_empty()) }
    })
    .await
    .expect("message arrives");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].data, "작업 1".as_bytes());
    assert_eq!(got[0].attributes["job_id"], "j1");
    ps.ack(&t.project, &t.subscription, &[got[0].ack_id.clone()])
        .await
        .expect("ack");

    // Firestore: create, conflicting create, conditional update (fresh and stale).
    let fs = Firestore::new(&emu.firestore_host, &t.project);
    let created = fs
        .create("jobs", "j1", json!({"status": {"stringValue": "queued"}}))
        .await
        .expect("create");
    let Write::Done(t0) = created else {
        panic!("first create must succeed")
    };
    assert_eq!(
        fs.create("jobs", "j1", json!({"status": {"stringValue": "queued"}}))
            .await
            .expect("second create"),
        Write::PreconditionFailed
    );
    let updated = fs
        .update_if(
            "jobs",
            "j1",
            &t0,
            json!({"status": {"stringValue": "running"}}),
        )
        .await
        .expect("update");
    assert!(matches!(updated, Write::Done(_)));
    assert_eq!(
        fs.update_if(
            "jobs",
            "j1",
            &t0,
            json!({"status": {"stringValue": "lost"}})
        )
        .await
        .expect("stale update"),
        Write::PreconditionFailed
    );
    let (fields, _) = fs.get("jobs", "j1").await.expect("get").expect("exists");
    assert_eq!(fields["status"]["stringValue"], "running");
    assert_eq!(fs.get("jobs", "absent").await.expect("get"), None);

    let groups = [emu.pubsub.pid(), emu.firestore.pid()];
    emu.stop();
    for pgid in groups {
        // SAFETY: signal 0 only checks for existence.
        let alive = unsafe { libc::kill(-(pgid as i32), 0) } == 0;
        assert!(!alive, "process group {pgid} still has processes");
    }
}

/// A port another process took after `free_port` saw it free makes the Pub/Sub emulator fail
/// its bind yet live on half-started: that is reported at once (and `Emulators::start` tries
/// other ports), not after the 90 s readiness wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_port_is_reported_at_once() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port to hold");
    let port = taken.local_addr().expect("address").port();
    let started = std::time::Instant::now();
    let err = Emulators::start_on(&log_dir(), port, stack::free_port().expect("a port"))
        .await
        .expect_err("the Pub/Sub emulator cannot bind a held port");
    assert!(
        err.downcast_ref::<stack::emulators::PortTaken>().is_some(),
        "{err:#}"
    );
    assert!(
        started.elapsed() < stack::emulators::READY_TIMEOUT / 2,
        "took {:?}",
        started.elapsed()
    );
}
